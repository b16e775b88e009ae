"""Process pools for the stages that read thousands of files (ingest, deidentify)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def worker_count(requested: int) -> int:
    """A ``workers`` param: 0 means every core this process may use."""
    return requested or len(os.sched_getaffinity(0))


def ordered_map(function: Callable[[T], R], items: Iterable[T], *, workers: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[R]:
    """``map(function, items)`` over ``workers`` forked processes (1: this one), in input order.

    Results come back as they are ready but in order, so outputs are the same bytes for any
    number of workers; chunks amortise the inter-process round trip. ``initializer(*initargs)``
    runs once in each process first: large shared read-only data travels that way, once per
    worker, instead of with every chunk.
    """
    items = list(items)
    if workers == 1 or len(items) < 2:
        if initializer is not None:
            initializer(*initargs)
        yield from map(function, items)
        return
    chunksize = max(1, min(32, len(items) // (workers * 8)))
    with multiprocessing.get_context("fork").Pool(workers, initializer, initargs) as pool:
        yield from pool.imap(function, items, chunksize=chunksize)
