"""train.py whose sharded checkpoint writes each take SLOW_SHARD_S (default 0.5) seconds longer: launched by the kill
tests (tests/test_resume_kill.py, tests/test_deepspeed.py), not collected.

    python tests/probe_slow_shards.py key=value ...

With ``checkpoint.async_save=true`` the step loop goes on meanwhile, so a test can SIGKILL a run while an
asynchronous save is in flight (its ``.tmp-step-N`` folder exists), deterministically.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit import shards  # noqa: E402
from toolkit.cli import train_main  # noqa: E402

write_shard = shards.write_shard


def slow_write_shard(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_SHARD_S", "0.5")))
    return write_shard(*args, **kwargs)


shards.write_shard = slow_write_shard  # the checkpointer calls shards.write_shard through the module

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
