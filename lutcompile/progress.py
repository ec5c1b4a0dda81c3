"""Stage timing and progress bars, shared by the pipeline, the budget search and the tools."""
from __future__ import annotations

import time
from contextlib import contextmanager

from tqdm.auto import tqdm


@contextmanager
def timed(seconds: dict[str, float], stage: str):
    """Add the time spent in the block to seconds[stage] (stages can run several times)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def bar(enabled: bool, desc: str):
    """A wrapper of iterables: a tqdm bar labelled `desc` when enabled, else the items as they are."""
    def wrap(items):
        return tqdm(items, desc=desc, leave=False, disable=not enabled)
    return wrap
