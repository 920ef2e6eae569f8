"""The tracking state some manifolds keep between steps (Stiefel's ``X^H m``), and its refresh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .buckets import Bucket, StateWrite

# A manifold's tracking state (see Manifold.momentum_step) is stored as "<momentum>_xtm" and
# rebuilt from the data every TRACKING_REFRESH_EVERY steps ("<momentum>_xtm_age" counts them
# on the host), which bounds the rounding drift of the algebra it replaces products with.
TRACKING = "_xtm"
TRACKING_AGE = "_xtm_age"
TRACKING_REFRESH_EVERY = 4


_TRACKING_NAMES = {m: (m + TRACKING, m + TRACKING_AGE) for m in ("exp_avg", "momentum_buffer")}


def tracking_key(state: dict[str, Any], momentum: str) -> tuple[bool, bool]:
    """(tracking state present, refresh due): part of a bucket key, so a bucket agrees on both."""
    name, age = _TRACKING_NAMES[momentum]
    return name in state, state.get(age, 0) >= TRACKING_REFRESH_EVERY


def tracking_inputs(bucket: Bucket, momentum: str) -> tuple[Tensor | None, bool]:
    """The stacked tracking state of a bucket (or None) and whether to rebuild it this step.

    Under ``torch.compile`` the state is rebuilt at every step: a host counter that changes
    every step would change the compiled graph's guards."""
    if torch.compiler.is_compiling():
        return bucket.state(momentum + TRACKING, "stored"), True
    refresh = bucket.states[0].get(momentum + TRACKING_AGE, 0) >= TRACKING_REFRESH_EVERY
    return bucket.state(momentum + TRACKING, "stored"), refresh


def tracking_outputs(
    bucket: Bucket, momentum: str, tracking: Tensor | None, used: Tensor | None, refreshed: bool
) -> tuple[list[StateWrite], tuple[str, ...], Callable[[], None] | None]:
    """Writes, deletions and host bookkeeping for a new tracking state (``used``: the one the
    step started from, kept where the step is skipped; ``refreshed``: this step was asked to
    rebuild it, which restarts its age)."""
    name, age = momentum + TRACKING, momentum + TRACKING_AGE
    if tracking is None:
        if not any(age in state for state in bucket.states):
            return [], (), None  # the manifold keeps none

        def reset() -> None:
            for state in bucket.states:
                state[age] = 0

        return [], (name,), reset

    def advance() -> None:
        for state in bucket.states:
            state[age] = 0 if refreshed else state.get(age, 0) + 1

    return [StateWrite(name, tracking, tuple(tracking.shape[1:]), used)], (), advance
