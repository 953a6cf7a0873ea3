"""`toolkit plot RUN_DIR`: a run's curves as PNG files from its metrics.jsonl, without a W&B account."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import PYTHON, read_jsonl, run, train

from toolkit import cli
from toolkit.plot import PlotError, plot_run

TOOLKIT = str(Path(PYTHON).with_name("toolkit"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real short run: 6 steps, a log line every 2 and a validation every 3. Accumulation 4 and an
    undamped noise-scale estimate, so that its noise_scale holds numbers (and a null) within 6 steps."""
    path = tmp_path_factory.mktemp("plot") / "run"
    train(["train.steps=6", "train.log_every=2", "train.val_every=3", "model.size=nano", "tracking.wandb=false",
           f"run.dir={path}", "data.max_bytes=200000", "train.progress=false", "batch.micro_size=8",
           "tracking.noise_scale_decay=0"], timeout=180)
    return path


def check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.01, f"{path} is blank"


def test_plot_writes_the_curves_of_a_real_run(run_dir):
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert any(r.get("noise_scale") is not None for r in records)
    assert any("val_loss" in r for r in records)
    result = run([TOOLKIT, "plot", str(run_dir)], timeout=120)
    assert result.returncode == 0, result.stderr
    names = ["loss.png", "lr.png", "throughput.png", "noise_scale.png"]
    assert result.stdout.splitlines() == [str(run_dir / "plots" / name) for name in names]
    for name in names:
        check_png(run_dir / "plots" / name)


def test_out_dir_and_a_torn_last_line(run_dir, tmp_path):
    copy = tmp_path / "killed"
    copy.mkdir()
    text = (run_dir / "metrics.jsonl").read_text()
    (copy / "metrics.jsonl").write_text(text + '{"step": 8, "samples": 256, "tok')  # killed mid-write
    said = []
    written = plot_run(copy, tmp_path / "pngs", say=said.append)
    assert [p.name for p in written] == ["loss.png", "lr.png", "throughput.png", "noise_scale.png"]
    assert all(p.parent == tmp_path / "pngs" for p in written) and not (copy / "plots").exists()
    assert said == []
    for path in written:
        check_png(path)


def test_noise_scale_without_numbers_is_skipped_with_a_reason(run_dir, tmp_path):
    records = [{**r, "noise_scale": None} if "loss" in r else r for r in read_jsonl(run_dir / "metrics.jsonl")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    said = []
    written = plot_run(tmp_path, say=said.append)
    assert [p.name for p in written] == ["loss.png", "lr.png", "throughput.png"]
    assert len(said) == 1 and said[0].startswith("noise_scale.png skipped: ")
    # Without accumulation or processes the run could not measure it; the line says that instead.
    no_accumulation = [{**r, "accumulation": 1} for r in records]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_accumulation))
    said.clear()
    plot_run(tmp_path, say=said.append)
    assert "more than one micro-batch" in said[0]


def test_missing_metrics_is_one_line_and_exit_2(tmp_path):
    result = run([TOOLKIT, "plot", str(tmp_path)], timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: no metrics file: {tmp_path / 'metrics.jsonl'} "
                                                  f"(a run writes it in its run.dir; is this a run directory?)"]


@pytest.mark.parametrize("content", ["", "\n", '{"step": 2, "loss": 5.0}\nnot json\n{"step": 4}\n'])
def test_empty_or_corrupt_metrics_is_one_line_and_exit_2(tmp_path, capsys, content):
    (tmp_path / "metrics.jsonl").write_text(content)
    assert cli.main(["plot", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert str(tmp_path / "metrics.jsonl") in err
    assert not (tmp_path / "plots").exists()


def test_plot_run_raises_plot_error(tmp_path):
    with pytest.raises(PlotError, match="metrics.jsonl"):
        plot_run(tmp_path)
    shutil.rmtree(tmp_path)
    with pytest.raises(PlotError, match="no metrics file"):
        plot_run(tmp_path)
