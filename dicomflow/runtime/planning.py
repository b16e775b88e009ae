"""Work planning shared by the two engines of :func:`~dicomflow.runtime.parallel.ordered_map`: the
local worker pool (:mod:`dicomflow.runtime.parallel`) and the Dask cluster
(:mod:`dicomflow.runtime.cluster`).

Both engines hold the same contract (results in input order, a failing item costs only itself),
so they plan the same way, here, once:

- items are numbered and cut into chunks (:func:`plan_chunks`), one message or task each, sized so
  that every worker slot gets several chunks;
- at most a window of items may be done ahead of the oldest unfinished one, which bounds the
  results held back to keep the order;
- a chunk whose worker was lost goes back to the front of the queue, in order
  (:func:`put_back`);
- a worker runs each item of a chunk through :func:`run_item`, which reports a failure by the
  exception's type name only (its message may quote a value read from the file);
- why an item has no result is a :class:`WorkFailure`.

Nothing here starts a process or talks to a cluster: the engines import this module, and this
module imports neither of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

CHUNK_MAX = 32          # items sent to a worker in one message (or one Dask task)
REORDER_WINDOW = 8      # chunks per worker slot that may be done ahead of the oldest unfinished item


@dataclass(frozen=True)
class WorkFailure:
    """Why an item has no result: ``worker_died`` (with how), ``timeout`` or ``worker_error``.

    ``detail`` names the exit signal or the exception type, never an exception's message (which
    may quote a value read from the file).
    """

    reason: str
    detail: str


def timeout_failure(timeout_s: float) -> WorkFailure:
    """The failure of an item still running after the per-item limit of ``timeout_s`` seconds."""
    return WorkFailure("timeout", f"still running after {timeout_s:g} s (the per-file time limit)")


def plan_chunks(n_items: int, *, slots: int) -> tuple[deque[list[int]], int]:
    """Cut items ``0 .. n_items - 1`` into chunks for ``slots`` workers (processes or threads).

    Parameters
    ----------
    n_items : int
        How many items there are.
    slots : int
        How many items can run at once (at least 1).

    Returns
    -------
    chunks : deque of list of int
        Consecutive item numbers, in order: about eight chunks per slot, at most
        :data:`CHUNK_MAX` items and at least one item each.
    window : int
        How many items past the oldest unfinished one may be started.
    """
    chunk = max(1, min(CHUNK_MAX, n_items // (slots * 8)))
    chunks = deque(list(range(start, min(start + chunk, n_items))) for start in range(0, n_items, chunk))
    return chunks, chunk * slots * REORDER_WINDOW


def put_back(todo: deque[list[int]], seqs: Sequence[int], *, chunk: int) -> None:
    """Put item numbers ``seqs`` back at the front of ``todo``, in order, in chunks of at most
    ``chunk`` items (the first one may be shorter); ``chunk=1`` runs each of them alone."""
    for end in range(len(seqs), 0, -chunk):
        todo.appendleft(list(seqs[max(0, end - chunk):end]))


def run_item(function: Callable[..., Any], item: Any, shared_args: tuple = ()) -> tuple[str, Any]:
    """``("ok", function(item, *shared_args))``, or ``("error", exception type name)`` for an item
    that raised.

    ``BaseException`` counts too (a Rust decoder's panic is one); an interrupt or an exit does not
    and is raised. The exception's message is dropped: it may quote a value read from the file.
    """
    try:
        return "ok", function(item, *shared_args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  reported as a failure of this item only
        return "error", type(err).__name__
