"""train.py whose checkpoint saves each wait 60 s first: launched by tests/test_first_hour.py, not collected.

    python tests/probe_slow_checkpoint.py key=value ...

It lets a test send a second Ctrl-C while the first one's checkpoint is pending, deterministically.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit import checkpoint  # noqa: E402
from toolkit.cli import train_main  # noqa: E402

save = checkpoint.save


def slow_save(*args, **kwargs):
    time.sleep(60)
    return save(*args, **kwargs)


checkpoint.save = slow_save  # the trainer calls checkpoint.save through the module

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
