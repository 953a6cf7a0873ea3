"""Where metrics go: the run directory's ``metrics.jsonl`` and ``summary.json`` (W&B comes later)."""

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


class MetricsLog:
    """One JSON object per logged step, appended and flushed at once (readable while the run goes on)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.history: list[dict] = []
        if enabled:
            self._file = open(path, "w")

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
