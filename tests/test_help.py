"""The help a user gets without reading the source: `train.py --help` (sections, exit codes, where runs
go), every config key with its documentation (`--help-config`, `toolkit config`), defaults in every
`toolkit` subcommand's help."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, run

from toolkit import cli
from toolkit.config import Config

TOOLKIT = str(Path(PYTHON).with_name("toolkit"))


def flat(text: str) -> str:
    """Whitespace collapsed: argparse and the docstrings wrap lines where they like."""
    return " ".join(text.split())


def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of a dataclass, read from config.py independently of the
    code under test."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:], strict=False)
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def leaves(cls=Config, prefix: str = ""):
    """(dotted name, dataclass field, docstring) for every leaf of the config, recursively."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            yield from leaves(factory, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, docs.get(f.name, "")


def shown_default(f: dataclasses.Field) -> str:
    """The default as YAML would write it."""
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(value) + "]"
    return value if isinstance(value, str) else repr(value)


def test_train_help_lists_sections_how_to_see_keys_exit_codes_and_run_files():
    result = run([PYTHON, "train.py", "--help"], timeout=60)
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    for f in dataclasses.fields(Config):
        assert f"\n  {f.name} " in result.stdout, f"section {f.name} not listed"
    assert "--help-config" in out and "toolkit config" in out
    for code, words in [("0", "done"), ("2", "bad configuration"), ("3", "a non-finite value"), ("4", "the disk filled"),
                        ("75", "preempted"), ("130", "interrupted (Ctrl-C)")]:
        assert f" {code} {words}" in out, f"exit code {code} not listed"
    assert "runs/<run.name>/" in out and "runs/<run.name>-debug/" in out and "run.dir" in out
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/", "wandb/", "final/"):
        assert name in out


def test_every_exit_code_constant_is_explained():
    codes = {name: value for name, value in vars(cli).items() if name.startswith("EXIT_") and isinstance(value, int)}
    assert {"EXIT_CONFIG", "EXIT_NONFINITE", "EXIT_DISK_FULL", "EXIT_PREEMPTED", "EXIT_INTERRUPTED"} <= set(codes)
    assert (cli.EXIT_DISK_FULL, cli.EXIT_INTERRUPTED) == (4, 130)
    help_text = flat(cli.build_train_parser().format_help())
    for name, value in codes.items():
        assert value in cli.EXIT_MEANINGS, f"{name}={value} is not in EXIT_MEANINGS"
        assert f" {value} {flat(cli.EXIT_MEANINGS[value])}" in help_text


def test_help_config_section_prints_keys_defaults_and_docstrings():
    result = run([PYTHON, "train.py", "--help-config", "batch"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "batch.global_size: int | full = 32" in result.stdout.splitlines()
    doc = field_docs(Config.__dataclass_fields__["batch"].default_factory)["global_size"]
    assert "Samples per optimizer step" in doc and flat(doc) in flat(result.stdout)
    assert "batch.micro_size: int | auto | None = null" in result.stdout
    assert "train.steps" not in result.stdout  # only the section asked for


def test_toolkit_config_documents_every_field_of_every_section(capsys):
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    names = list(leaves())
    assert len(names) > 40
    for dotted, f, doc in names:
        assert doc.strip(), f"{dotted} has no docstring in toolkit/config.py"
        head = [line for line in lines if line.startswith(f"{dotted}: ")]
        assert len(head) == 1, f"{dotted} is not listed once"
        assert head[0].endswith(f" = {shown_default(f)}"), head[0]
        assert flat(doc) in flat(out), f"the docstring of {dotted} is not shown"


def test_toolkit_config_shows_resolved_values_and_marks_changes(capsys, tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("train:\n  steps: 7\n")
    assert cli.main(["config", "--config", str(yaml), "train.steps", "batch", "batch.global_size=64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = {ln.split(":")[0]: ln for ln in lines if ln[:1].isalpha()}
    assert line["train.steps"].startswith("train.steps: int = 300") and line["train.steps"].endswith("-> 7  *")
    assert line["batch.global_size"].endswith("-> 64  *")
    assert line["batch.micro_size"].endswith("-> null")  # equal to the default: not marked
    assert "train.log_every" not in line


@pytest.mark.parametrize("cmd", [[PYTHON, "train.py", "--help-config", "nope"], [TOOLKIT, "config", "nope"],
                                 [TOOLKIT, "config", "batch.nope"]])
def test_unknown_section_is_one_line_and_exit_2(cmd):
    result = run(cmd, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "nope" in result.stderr and ("tracking" in result.stderr or "batch.global_size" in result.stderr)


def test_bench_parity_help_shows_its_defaults():
    result = run([TOOLKIT, "bench", "parity", "--help"], timeout=60)
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "optimizer steps per timed run (default: 30)" in out
    assert "alternating timed runs of each loop (default: 3)" in out
    assert "configs/bench-parity.yaml" in out


def test_every_toolkit_option_help_names_its_default():
    parser = cli.build_toolkit_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"plan", "bench", "config", "plot"} <= set(commands)
    for name, sub in commands.items():
        text = flat(sub.format_help())
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue  # a positional, or nothing to show (a default in words: "(default: configs/tiny.yaml)")
            said = "default" in (action.help or "")
            assert said or f"(default: {action.default})" in text, \
                f"toolkit {name} {action.option_strings[0]}: its help does not show its default"


def test_train_help_config_runs_from_any_directory(tmp_path):
    # The docstrings are read from the installed module's source, not from the working directory.
    result = run([PYTHON, str(ROOT / "train.py"), "--help-config", "seed"], timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "seed: int = 1337" in result.stdout
