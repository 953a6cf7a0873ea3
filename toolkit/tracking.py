"""Where metrics go: the run directory's ``metrics.jsonl`` and ``summary.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path


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


class MetricsLog:
    """One JSON object per logged step, appended and flushed at once (readable while the run goes on).

    A fresh run starts the file anew; a resumed run appends after the records up to its checkpoint."""

    def __init__(self, path: Path, enabled: bool, resumed_step: int | None = None):
        self.path, self.enabled = path, enabled
        self.history: list[dict] = []
        if enabled:
            if resumed_step is not None and path.exists():
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
