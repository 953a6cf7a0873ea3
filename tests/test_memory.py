"""Memory per device measured on CPU for ZeRO stages 0-3 with 2 processes (``toolkit bench memory``):
it goes down in the order the ZeRO paper predicts, and the prediction is within 25% of the measurement.

The model (configs/bench-memory.yaml) has 57M parameters, so that its states (~1 GiB per process at
stage 0) dominate what the process holds anyway; the runs measure the peak resident set above the one
before the model was built, up to the optimizer update (toolkit/memory.py says why there).
"""

from __future__ import annotations

import json
import subprocess

from conftest import PYTHON, ROOT, child_env

TOL = 0.25


def test_measured_memory_follows_the_zero_stages():
    result = subprocess.run([PYTHON, "-m", "toolkit.cli", "bench", "memory", "--stages", "0,1,2,3", "--json"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads(result.stdout)
    print("\n" + bench["report"])
    rows = bench["rows"]
    assert [r["mode"] for r in rows] == ["ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    measured = [r["measured_gib"] for r in rows]
    assert all(a > b for a, b in zip(measured, measured[1:], strict=False)), f"not decreasing stage by stage: {measured}"
    for r in rows:
        assert r["measured"] == "peak_rss"
        assert abs(r["relative_error"]) <= TOL, f"{r['mode']}: predicted {r['predicted_gib']:.3f} GiB, measured {r['measured_gib']:.3f}"
