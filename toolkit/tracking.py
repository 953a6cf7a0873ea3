"""Where metrics go: the run directory's ``metrics.jsonl`` and ``summary.json``, and Weights & Biases.

W&B runs through Accelerate's tracker on the main process. Its mode is decided before ``wandb.init``
so that training never waits for a server: offline when WANDB_MODE says so, when there is no API key,
or when the W&B server does not answer an HTTP request within a few seconds (``wandb.init`` with a key
and no network would block about 90 s before failing); an online start that fails anyway (a bad key)
falls back to offline. Offline runs are written under
``run.dir/wandb/offline-run-*`` and uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

# metrics.jsonl key -> W&B name. Both get the same numbers; W&B's names group them into panels.
WANDB_NAMES = {
    "samples": "samples",
    "tokens": "tokens",
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "skipped_steps": "train/skipped_steps",
    "tokens_per_s": "perf/tokens_per_s",
    "tokens_per_s_per_device": "perf/tokens_per_s_per_device",
    "samples_per_s": "perf/samples_per_s",
    "step_time_s": "perf/step_time_s",
    "mfu": "perf/mfu",
    "memory_peak_gib": "memory/peak_gib",
    "global_size": "batch/global_size",
    "micro_size": "batch/micro_size",
    "accumulation": "batch/accumulation",
    "world_size": "batch/world_size",
    "noise_scale": "batch/noise_scale",
    "critical_batch_tokens": "batch/critical_batch_tokens",
    "noise_grad_sq": "batch/noise_grad_sq",
    "noise_trace": "batch/noise_trace",
    "train_time_s": "perf/train_time_s",
    "val_loss": "val/loss",
}
PROBE_TIMEOUT_S = 3.0


def has_api_key() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the W&B server answers an HTTP request within ``timeout`` seconds (any HTTP status counts;
    no name, no route, a failed TLS handshake or silence do not). The request runs in a thread that is
    abandoned after the timeout, since a name lookup cannot be cut short."""
    import urllib.error
    import urllib.request

    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # it answered, if only with an error status
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def wandb_mode() -> tuple[str, str]:
    """(``online`` | ``offline`` | ``disabled``, why)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun"):
        return "offline", f"WANDB_MODE={mode}"
    if mode == "disabled":
        return "disabled", "WANDB_MODE=disabled"
    if not has_api_key():
        return "offline", "no W&B API key"
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not reachable(url):
        return "offline", f"{urlparse(url).hostname} did not answer within {PROBE_TIMEOUT_S:.0f} s"
    return "online", "API key and network"


def start_wandb(accelerator, project: str, config: dict, run_dir: Path, run_id: str, name: str, group: str,
                tags: list[str]) -> str:
    """Start (or continue, same ``run_id``) the W&B run through Accelerate's tracker on the main process.
    Returns the mode it runs in; says where the files are and how to upload them when offline."""
    import wandb

    mode, why = wandb_mode()
    if mode == "disabled":
        return mode
    # W&B's own cache and data folders go under the run too (it would use ~/.cache and ~/.local/share).
    os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / "wandb" / "cache"))
    os.environ.setdefault("WANDB_DATA_DIR", str(run_dir / "wandb" / "data"))

    def init(mode: str) -> None:
        accelerator.init_trackers(project, config=config, init_kwargs={"wandb": {
            "dir": str(run_dir), "id": run_id, "resume": "allow", "name": name, "group": group, "tags": tags,
            "mode": mode, "settings": wandb.Settings(console="off", silent=True, init_timeout=30),
        }})

    try:
        init(mode)
    except Exception as exc:  # an online start that fails (bad key, server error): record offline instead
        if mode != "online":
            raise
        print(f"wandb: online start failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
              f"recording offline", file=sys.stderr, flush=True)
        mode, why = "offline", "online start failed"
        wandb.teardown()  # W&B's service still holds the failed run's id; a fresh one starts with the next init
        init(mode)
    run = accelerator.get_tracker("wandb", unwrap=True)
    # Every metric against samples by default; tokens is logged as the other x-axis.
    run.define_metric("samples")
    run.define_metric("tokens")
    for prefix in ("train", "perf", "memory", "batch", "val"):
        run.define_metric(f"{prefix}/*", step_metric="samples")
    folder = Path(run.dir).parent  # run.dir is the run's files/ folder
    if mode == "offline":
        print(f"wandb: offline ({why}); run {run_id} in {folder}; upload it with: wandb sync {folder}", flush=True)
    else:
        print(f"wandb: {run.url}", flush=True)
    return mode


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file, flush it, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cut_after_step(path: Path, step: int) -> None:
    """Truncate ``path`` just before its first record of a step after ``step`` (or a torn last line).

    A run killed after its last checkpoint logged steps that the resumed run will log again; cutting
    them keeps every step once. The bytes before the cut are never rewritten.
    """
    offset = 0
    with open(path, "rb+") as f:
        for line in f:
            try:
                if not line.endswith(b"\n") or json.loads(line)["step"] > step:
                    break
            except (ValueError, KeyError):  # a line torn by the kill
                break
            offset += len(line)
        f.truncate(offset)
        os.fsync(f.fileno())


def last_step(path: Path) -> int:
    """The largest step of the whole records in ``path`` (-1 if none)."""
    steps = [-1]
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            steps.append(json.loads(line)["step"] if line.endswith(b"\n") else -1)
        except (ValueError, KeyError):
            pass
    return max(steps)


class MetricsLog:
    """One JSON object per logged step, appended and flushed at once (readable while the run goes on).

    A fresh run starts the file anew; a resumed run appends after the records up to its checkpoint."""

    def __init__(self, path: Path, enabled: bool, resumed_step: int | None = None):
        self.path, self.enabled = path, enabled
        self.history: list[dict] = []
        self.logged_up_to = -1  # the last step the file held before the cut (a killed run logged it to W&B too)
        if enabled:
            if resumed_step is not None and path.exists():
                self.logged_up_to = last_step(path)
                cut_after_step(path, resumed_step)
                self.history = [json.loads(line) for line in path.read_text().splitlines()]
                self._file = open(path, "a")
            else:
                self._file = open(path, "w")

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def package_versions(packages=("torch", "accelerate", "deepspeed", "wandb", "transformers")) -> dict:
    import importlib.metadata

    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


class Tracker:
    """The run's records: ``metrics.jsonl`` (main process) and the W&B run (its mode, name, group, config,
    and the summary), with a resumed run's steps sent to W&B once only."""

    def __init__(self, accelerator, run_dir: Path, is_main: bool):
        self.accelerator, self.run_dir, self.is_main = accelerator, run_dir, is_main
        self.wandb_mode = "off"
        self.metrics: MetricsLog | None = None

    def start(self, tracking, run_name: str, default_group: str, run_id: str, config: dict,
              resumed_step: int | None) -> None:
        """Open metrics.jsonl (a resumed run cuts it back to its checkpoint's step) and start or continue the
        W&B run ``run_id``."""
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.is_main, resumed_step=resumed_step)
        if self.is_main and self.accelerator.log_with:
            self.wandb_mode = start_wandb(self.accelerator, tracking.project, config, self.run_dir, run_id, run_name,
                                          tracking.group or default_group, list(tracking.tags))

    @property
    def recording(self) -> bool:
        return self.wandb_mode in ("online", "offline")

    @property
    def history(self) -> list[dict]:
        return self.metrics.history

    def log(self, record: dict) -> None:
        """One record to metrics.jsonl and, under W&B's names, to W&B. A resumed run does not send W&B the steps
        the killed run had already sent (the same numbers: the resume is exact), so that W&B's steps keep
        increasing."""
        self.metrics.log(record)
        if self.recording and record["step"] > self.metrics.logged_up_to:
            values = {WANDB_NAMES[k]: v for k, v in record.items() if k in WANDB_NAMES and v is not None}
            self.accelerator.log(values, step=record["step"])

    def summarise(self, summary: dict) -> None:
        """The run's summary as the W&B run's ``final/*`` summary values."""
        if self.is_main and self.recording:
            self.accelerator.get_tracker("wandb", unwrap=True).summary.update(
                {f"final/{k}": v for k, v in summary.items() if isinstance(v, int | float) and v is not None})

    def fail(self) -> None:
        """End the W&B run as failed (exit code 1): the run crashed; ``close`` would finish it as a success."""
        if self.is_main and self.recording:
            self.accelerator.get_tracker("wandb", unwrap=True).finish(exit_code=1)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
