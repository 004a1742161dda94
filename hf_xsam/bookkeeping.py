"""A replayed pass must leave the trainer as its theta_0 pass left it: `bookkeeping_kept` puts back whatever a
trainer's `compute_loss` counts or logs (trl's token counts and metric lists, a user's counters)."""

from __future__ import annotations

import collections
import contextlib
import copy

_PLAIN = (type(None), bool, int, float, str)
_DATA_ATTRIBUTES = frozenset({"train_dataset", "eval_dataset"})  # the data, however plainly it is held


# Bookkeeping is small (counters, the metric lists of one logging window); a larger container of plain values is
# data (a tokenized dataset held as lists of ints), which a replay must neither copy nor scan in full.
_BOOKKEEPING_MAX_VALUES = 10_000


def is_bookkeeping(value) -> bool:
    """Numbers and strings, and lists, tuples, deques and dicts of them nested at most 4 deep, with at most
    ``_BOOKKEEPING_MAX_VALUES`` values in all: what a trainer counts and logs with."""
    budget = [_BOOKKEEPING_MAX_VALUES]

    def plain(x, depth: int) -> bool:
        budget[0] -= 1
        if budget[0] < 0:
            return False
        if isinstance(x, _PLAIN):
            return True
        if depth > 3:
            return False
        if isinstance(x, dict):
            return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in x.items())
        if isinstance(x, (list, tuple, collections.deque)):
            return all(plain(v, depth + 1) for v in x)
        return False

    return plain(value, 0)


@contextlib.contextmanager
def bookkeeping_kept(trainer):
    """Run a replayed pass without side effects on the trainer's own bookkeeping: whatever `compute_loss` counts or
    logs (trl's token counts and metric lists, a user's counters) is put back as it was. General, not per trainer:
    every attribute holding only numbers, strings and containers of them is copied before and restored after."""
    saved = {name: copy.deepcopy(value) for name, value in vars(trainer).items()
             if name not in _DATA_ATTRIBUTES and is_bookkeeping(value)}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)
