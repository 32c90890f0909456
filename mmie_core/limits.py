"""Time limits for one request's model work.

A web request must not hold the model for ever: `time_limit(seconds)` sets a deadline for the
code that runs inside it, and the library checks it wherever work repeats (every forward pass of
an explanation, every generated token, every image of a batch). Past the deadline,
`check_deadline()` raises `TimeLimitError`, whose message tells the user what to change; hooks
and other resources are released by the `finally` blocks on the way out, as with any error.

The deadline lives in a context variable, so concurrent requests in other threads each have
their own. Code that hands work to another thread (streaming generation) captures the deadline
first with `current_deadline()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from typing import Iterator

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("mmie_deadline", default=None)


class TimeLimitError(ValueError):
    """The request's work went past its time limit."""


def current_deadline() -> float | None:
    """The active deadline (a `time.monotonic()` value), or None when there is no limit."""
    return _DEADLINE.get()


@contextlib.contextmanager
def deadline(at: float | None) -> Iterator[None]:
    """Run the block under the absolute deadline `at` (`time.monotonic()`; None = no limit).
    A deadline already in force that comes earlier is kept."""
    outer = _DEADLINE.get()
    if outer is not None and (at is None or outer < at):
        at = outer
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_limit(seconds: float | None) -> contextlib.AbstractContextManager[None]:
    """Run the block with at most `seconds` of wall time (None or <= 0: no limit)."""
    return deadline(time.monotonic() + seconds if seconds and seconds > 0 else None)


def seconds_left() -> float | None:
    at = _DEADLINE.get()
    return None if at is None else at - time.monotonic()


def check_deadline() -> None:
    """Raise TimeLimitError if the active deadline has passed."""
    left = seconds_left()
    if left is not None and left <= 0:
        raise TimeLimitError(
            "This request reached its time limit and was stopped. Try fewer steps or samples, a smaller "
            "window, fewer images or tokens, or a smaller model."
        )


def DeadlineCriteria(at: float | None):
    """A `generate` stopping criterion that ends generation at `at` (a `time.monotonic()` deadline
    captured from the caller's context, since generation may run in another thread): transformers'
    MaxTimeCriteria with the time left, which also records in `fired` whether it stopped generation."""
    from transformers import MaxTimeCriteria

    class _Deadline(MaxTimeCriteria):
        def __init__(self):
            left = math.inf if at is None else at - time.monotonic()
            super().__init__(max_time=left)
            self.at = at
            self.fired = False

        def __call__(self, input_ids, scores, **kwargs):
            over = super().__call__(input_ids, scores, **kwargs)
            self.fired = self.fired or bool(over.any())
            return over

    return _Deadline()
