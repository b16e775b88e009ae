"""Per-file work on a Dask cluster: the engine of :func:`~dicomflow.runtime.parallel.ordered_map`
when ``DASK_SCHEDULER_ADDRESS`` is set (Dask's own variable, the address of a running ``dask
scheduler``).

The contract is the local pool's: results in input order, so the stage writes the same bytes
however many workers ran; an item whose worker dies or runs past the per-item time limit gets
``on_failure`` and costs nothing else. ``distributed`` does the scheduling, data transfer, worker
restarts and retries; this module only chunks, keeps order and turns a lost chunk into per-item
results:

- Items travel in chunks (the round trip to the scheduler costs about a millisecond a task). A
  chunk whose task fails as a whole (its worker died ``allowed-failures`` times, ``KilledWorker``,
  or its result could not be sent back) is split and its items run one task each.
- The scheduler blames every task a dying worker held, queued ones too, so an item whose own task
  fails is a suspect only: once nothing else runs, it runs again alone, and only then does it get
  ``worker_died``. Killer files are rare; the pause costs one item's time each.
- Dask cannot stop a running task, so a task still running after ``timeout_s`` is cancelled and
  its worker restarted by its nanny; a chunk is split, an item is a suspect as above (it may have
  waited behind another task on its worker) and gets ``timeout`` when it overruns alone.
- ``shared_args`` are scattered to every worker once and handed to each chunk's task as an
  argument, never kept as worker state: workers may have several threads and serve other
  clients and other runs at the same time.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from dicomflow.runtime.planning import WorkFailure, plan_chunks, put_back, run_item, timeout_failure

T = TypeVar("T")
R = TypeVar("R")

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
WORKERS_WAIT_S = 60.0   # a scheduler with no worker yet: how long to wait for the first one
POLL_S = 1.0            # how often running chunks are checked against the time limit

logger = logging.getLogger(__name__)


def scheduler_address(environ: Mapping[str, str] = os.environ) -> str | None:
    """The scheduler named by ``DASK_SCHEDULER_ADDRESS``, or None (an empty value is None)."""
    return environ.get(SCHEDULER_ENV, "").strip() or None


def _run_chunk(function: Callable[..., Any], items: list, shared_args: tuple) -> list[tuple[str, Any]]:
    """Run on a worker: ``function(item, *shared_args)`` on each item through
    :func:`~dicomflow.runtime.planning.run_item` (``("ok", result)`` or ``("error", exception type
    name)``), as the local pool's workers do."""
    return [run_item(function, item, shared_args) for item in items]


def cluster_map(function: Callable[[T], R], items: Iterable[T], *, address: str,
                on_failure: Callable[[T, WorkFailure], R], timeout_s: float | None = None,
                shared_args: tuple = ()) -> Iterator[R]:
    """``map(function, items)`` on the Dask cluster at ``address``, in input order; see the module
    docstring. ``function``, the items and the results must pickle, and the scheduler and workers
    must import the same code (``dicomflow`` installed where they run); with a shared filesystem,
    paths are the items and the workers read the files themselves."""
    from distributed import Client  # imported here: a local run never pays for it

    items = list(items)
    if not items:
        return
    with Client(address, set_as_default=False, timeout="30s") as client:
        try:
            client.wait_for_workers(1, timeout=WORKERS_WAIT_S)
        except TimeoutError:
            raise RuntimeError(f"the Dask scheduler at {address} ({SCHEDULER_ENV}) has no worker "
                               f"after {WORKERS_WAIT_S:g} s: start some with `dask worker {address}`, "
                               f"or unset {SCHEDULER_ENV} to run on this machine") from None
        threads = sum(client.nthreads().values())
        logger.info("running %d items on the Dask cluster at %s (%d worker(s), %d thread(s))",
                    len(items), address, len(client.nthreads()), threads)
        run = _ClusterRun(client, function, items, threads=threads, timeout_s=timeout_s)
        if shared_args:
            run.share(shared_args)
        try:
            for seq, (ok, value) in run.results():
                yield value if ok else on_failure(items[seq], value)
        finally:
            run.close()


class _ClusterRun:
    """The bookkeeping of one :func:`cluster_map`: chunks to do, tasks running, results to yield."""

    def __init__(self, client: Any, function: Callable[[Any], Any], items: list, *, threads: int,
                 timeout_s: float | None) -> None:
        self.client, self.function, self.items, self.timeout_s = client, function, items, timeout_s
        self.threads = threads
        self.todo, self.window = plan_chunks(len(items), slots=threads)
        self.suspects: deque[int] = deque()  # items to run again, alone
        self.running: dict[Any, tuple[list[int], bool]] = {}  # future -> (item numbers, alone)
        self.started: dict[Any, float] = {}  # future -> when the scheduler first showed it running
        self.done: dict[int, tuple[bool, Any]] = {}
        self.shared: Any = None  # the future of the scattered shared_args, once shared

    def share(self, shared_args: tuple) -> None:
        """Send ``shared_args`` to every worker once; each chunk's task then names them."""
        [self.shared] = self.client.scatter([shared_args], broadcast=True, hash=False)

    def results(self) -> Iterator[tuple[int, tuple[bool, Any]]]:
        """``(item number, (ok, result or WorkFailure))`` in item order."""
        from distributed import wait

        next_out = 0
        while next_out < len(self.items):
            self._submit(limit=next_out + self.window)
            try:
                with self.client.as_current():  # wait() asks for the current client
                    wait(list(self.running), timeout=POLL_S if self.timeout_s else None,
                         return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
            for future in [f for f in self.running if f.done()]:
                seqs, alone = self.running.pop(future)
                self.started.pop(future, None)
                if future.status == "finished":
                    for seq, (kind, value) in zip(seqs, future.result()):
                        self.done[seq] = (True, value) if kind == "ok" else (
                            False, WorkFailure("worker_error", value))
                else:
                    self._lost(seqs, alone, _why_lost(future))
                future.release()
            if self.timeout_s:
                self._stop_overruns()
            while next_out in self.done:
                yield next_out, self.done.pop(next_out)
                next_out += 1

    def _submit(self, *, limit: int) -> None:
        if self.suspects:  # the cluster drains first, then each suspect runs alone
            if not self.running:
                self._start([self.suspects.popleft()], alone=True)
            return
        while self.todo and len(self.running) < self.threads * 2 and self.todo[0][0] < limit:
            self._start(self.todo.popleft(), alone=False)

    def _start(self, seqs: list[int], *, alone: bool) -> None:
        future = self.client.submit(_run_chunk, self.function, [self.items[seq] for seq in seqs],
                                    () if self.shared is None else self.shared, pure=False)
        self.running[future] = (seqs, alone)

    def _lost(self, seqs: list[int], alone: bool, failure: WorkFailure) -> None:
        """A task that failed as a whole: a chunk goes back as one task per item, at the front and
        in order; an item becomes a suspect; an item that failed alone has ``failure``."""
        if alone:
            self.done[seqs[0]] = (False, failure)
        elif len(seqs) == 1:
            self.suspects.append(seqs[0])
        else:
            put_back(self.todo, seqs, chunk=1)

    def _stop_overruns(self) -> None:
        """Cancel each task that has run longer than ``timeout_s`` and restart its worker (a Dask
        task cannot be interrupted)."""
        now = time.monotonic()
        by_key = {future.key: future for future in self.running}
        overrun_workers = set()
        for worker, keys in self.client.processing().items():
            for key in keys:
                future = by_key.get(key)
                if future is not None and now - self.started.setdefault(future, now) > self.timeout_s:
                    overrun_workers.add(worker)
                    seqs, alone = self.running.pop(future)
                    self.started.pop(future)
                    future.cancel()
                    self._lost(seqs, alone, timeout_failure(self.timeout_s))
        if overrun_workers:
            self.client.restart_workers(sorted(overrun_workers), raise_for_error=False)

    def close(self) -> None:
        self.client.cancel(list(self.running))
        if self.shared is not None:
            self.shared.release()


def _why_lost(future: Any) -> WorkFailure:
    """Why a task failed as a whole, in words that quote nothing of the data."""
    error = future.exception() if future.status == "error" else None
    if type(error).__name__ == "KilledWorker":
        return WorkFailure("worker_died", "killed every Dask worker that ran it (KilledWorker)")
    return WorkFailure("worker_error", type(error).__name__ if error else future.status)
