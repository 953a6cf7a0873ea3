"""The ``toolkit bench`` commands, one module each:

* ``toolkit.bench.parity``: ``toolkit bench parity``, the toolkit's training loop timed against a plain
  PyTorch loop (also ``toolkit_run`` and ``plain_run``, the two loops);
* ``toolkit.bench.tracking``: ``toolkit bench tracking``, the loop with W&B and the noise scale on vs off;
* ``toolkit.bench.memory``: ``toolkit bench memory``, memory per device measured against the prediction;
* ``toolkit.bench.common``: helpers they share (``max_rel_diff`` of two sets of weights, among others).
"""
