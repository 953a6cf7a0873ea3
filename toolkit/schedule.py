"""The learning-rate schedule, counted in samples so that it does not depend on the GPU count."""

from __future__ import annotations

import math


def lr_at(samples_done: int, peak: float, minimum: float, warmup_samples: int, decay_samples: int) -> float:
    """Learning rate for the optimizer step that ends at ``samples_done`` samples.

    Linear warmup from 0 to ``peak`` over ``warmup_samples``, then cosine decay to ``minimum`` at
    ``decay_samples``, flat after that.
    """
    if warmup_samples > 0 and samples_done <= warmup_samples:
        return peak * samples_done / warmup_samples
    if samples_done >= decay_samples or decay_samples <= warmup_samples:
        return minimum
    progress = (samples_done - warmup_samples) / (decay_samples - warmup_samples)
    return minimum + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - minimum)
