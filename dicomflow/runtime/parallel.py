"""Per-file work in worker processes that may die: the stages that read thousands of files.

:func:`ordered_map` is ``map`` over worker processes, in input order, where one item can cost
only itself. A worker that dies on an item (a decoder that panics or aborts, a segfault, SIGKILL
from the OOM killer) or runs past the per-item time limit is replaced, and that item's result is
made by ``on_failure`` (the stages turn it into a quarantine row); the other items are done as
if nothing happened, so the output is the same bytes for any number of workers.

Written here rather than taken from ``multiprocessing.Pool`` or ``concurrent.futures``:
``Pool.imap`` waits forever for the result of a worker that died, and ``ProcessPoolExecutor``
marks every pending item of the pool as failed (``BrokenProcessPool``) without saying which item
killed it. Each worker here reports every item as it finishes it, so the parent always knows
which item a worker was on when it died or overran its time.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import multiprocessing.context
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import forkserver, popen_forkserver, spawn, util
from multiprocessing.connection import Connection, wait
from typing import Any, Generic, TypeVar

from dicomflow.runtime.cluster import cluster_map, scheduler_address
from dicomflow.runtime.planning import CHUNK_MAX, WorkFailure, plan_chunks, put_back, run_item, timeout_failure

T = TypeVar("T")
R = TypeVar("R")

CHUNKS_IN_FLIGHT = 2    # per worker: the next chunk is already there when one ends


def worker_count(requested: int) -> int:
    """A ``workers`` param: 0 means every core this process may use."""
    return requested or len(os.sched_getaffinity(0))


def exit_description(exitcode: int | None) -> str:
    """A worker's end in words: ``killed by SIGKILL``, ``exited with status 3``."""
    if exitcode is None:
        return "ended without an exit status"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _serve(conn: Connection, function: Callable[..., Any], shared_args: tuple) -> None:
    """A worker's life: each item of each chunk, ``function(item, *shared_args)``, reporting every
    item (``shared_args`` arrived once, with the process).

    An item that raises is reported by :func:`~dicomflow.runtime.planning.run_item` (the exception's
    type name only); the worker then goes on with the next item. A parent that went away (it
    ended, or closed the pool, before this worker said it was ready or while it reported) ends
    the worker quietly: Python would print "Process ForkServerProcess-N:" and a traceback, cut
    short when the ending parent terminates its children.
    """
    # Ctrl-C in a terminal reaches every process of the group: the parent stops the workers, and
    # none prints a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        conn.send(("ready", -1, None))
        while True:
            message = conn.recv()
            if message is None:
                return
            first, chunk = message
            for seq, item in enumerate(chunk, start=first):
                kind, value = run_item(function, item, shared_args)
                try:
                    conn.send((kind, seq, value))
                except _PARENT_GONE:
                    raise
                except Exception as err:  # noqa: BLE001  a result that cannot be pickled
                    conn.send(("error", seq, f"result not transferable ({type(err).__name__})"))
    except _PARENT_GONE:  # nothing left to do
        return


# A pipe whose other end is closed: reading gives EOFError, writing BrokenPipeError.
_PARENT_GONE = (EOFError, BrokenPipeError, ConnectionResetError)


class _MainFreePopen(popen_forkserver.Popen):
    """``popen_forkserver.Popen`` whose child does not run the parent's ``__main__`` again.

    Why: every child a forkserver forks first runs ``multiprocessing.spawn.prepare`` on data the
    parent sends it, and that data names the parent's main module (``init_main_from_path``: the
    ``__file__`` of ``python recipe.py``; ``init_main_from_name``: the module of ``python -m``),
    which ``spawn._fixup_main_from_path`` / ``_fixup_main_from_name`` then run as ``__mp_main__``
    (CPython 3.11, Lib/multiprocessing/spawn.py). ``set_forkserver_preload`` does not change that:
    it decides what the *server* imports, not what each child runs. A user's script without an
    ``if __name__ == "__main__":`` guard would so run again in every decoder, load the model
    there and start decoders of its own, which multiprocessing refuses in a child still starting
    (the worker exits with status 1 before it can work); a stage's module would import TensorFlow
    in each. The decoders need nothing from ``__main__`` (their function and arguments are
    library objects, pickled by module name), so the parent leaves the main module out of the
    data it sends; the rest is ``_launch`` of CPython 3.11 (requires-python pins 3.11), and
    tests/test_parallel.py runs an unguarded script to hold it.
    """

    def _launch(self, process_obj):
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        multiprocessing.context.set_spawning_popen(self)
        try:
            multiprocessing.context.reduction.dump(prep_data, buf)
            multiprocessing.context.reduction.dump(process_obj, buf)
        finally:
            multiprocessing.context.set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)  # the child's sentinel of its parent, as in CPython
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as stream:
            stream.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _MainFreeForkServerProcess(multiprocessing.context.ForkServerProcess):
    """A forkserver process started through :class:`_MainFreePopen`."""

    @staticmethod
    def _Popen(process_obj):
        return _MainFreePopen(process_obj)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    broken: bool = False  # a send failed: it died, which its sentinel will tell
    pending: deque = field(default_factory=deque)  # seqs sent and not reported, in work order
    started: float = 0.0  # when the item at pending[0] began

    @property
    def chunks_in_flight(self) -> int:
        return len(self.pending)


class WorkerPool(Generic[T, R]):
    """Worker processes running ``function`` on items; see :func:`ordered_map`.

    Kept open across calls of :meth:`map` where workers are costly to start (the served model's
    decoders); ``close`` ends them. ``context`` is a multiprocessing start method; with
    ``forkserver``, workers fork from a fresh server process that imported ``preload``, and
    neither the server nor the workers run the caller's ``__main__`` (which for a stage or a
    server imports TensorFlow, and for a user's unguarded script would predict again in each
    worker): :class:`_MainFreePopen`.
    """

    def __init__(self, function: Callable[..., R], *, workers: int, context: str = "fork",
                 shared_args: tuple = (), timeout_s: float | None = None,
                 preload: tuple[str, ...] = ()) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1; got {workers}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive or None; got {timeout_s}")
        self.function, self.workers, self.timeout_s = function, workers, timeout_s
        self._context = multiprocessing.get_context(context)
        self._process = self._context.Process
        if context == "forkserver":  # the server imports these; no child runs the caller's __main__
            self._context.set_forkserver_preload(list(preload))
            self._process = _MainFreeForkServerProcess
        self._shared_args = shared_args
        self._pool: list[_Worker] = []

    def _start(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._process(target=_serve, daemon=True,
                                        args=(child, self.function, self._shared_args))
        process.start()
        child.close()
        return _Worker(process, parent)

    def _stop(self, worker: _Worker, *, wait_s: float = 0.0) -> None:
        """End ``worker``; ``wait_s``: time for a dying one to finish dying on its own first."""
        worker.process.join(timeout=wait_s)
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.conn.close()

    def close(self) -> None:
        for worker in self._pool:
            with contextlib.suppress(OSError):  # already dead: the join and kill below still apply
                worker.conn.send(None)
            worker.process.join(timeout=1)
            self._stop(worker)
        self._pool = []

    def __enter__(self) -> WorkerPool[T, R]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def map(self, items: Iterable[T], *, on_failure: Callable[[T, WorkFailure], R]) -> Iterator[R]:
        """``function(item)`` for each item, in input order; ``on_failure(item, why)`` for an
        item whose worker died, overran ``timeout_s`` or raised."""
        items = list(items)
        todo, window = plan_chunks(len(items), slots=self.workers)
        results: dict[int, tuple[bool, Any]] = {}
        next_out = 0
        try:
            while len(self._pool) < min(self.workers, max(1, len(todo))):
                self._pool.append(self._start())
            while next_out < len(items):
                self._dispatch(todo, items, limit=next_out + window)
                self._collect(todo, results)
                while next_out in results:
                    ok, value = results.pop(next_out)
                    yield value if ok else on_failure(items[next_out], value)
                    next_out += 1
        except BaseException:
            for worker in self._pool:  # mid-run: their work is abandoned
                self._stop(worker)
            self._pool = []
            raise

    def _dispatch(self, todo: deque[list[int]], items: list[T], *, limit: int) -> None:
        for worker in self._pool:
            while (worker.ready and not worker.broken and todo
                   and worker.chunks_in_flight < CHUNKS_IN_FLIGHT and todo[0][0] < limit):
                seqs = todo.popleft()
                try:
                    worker.conn.send((seqs[0], [items[seq] for seq in seqs]))
                except OSError:  # it died since the last look: this chunk never reached it
                    todo.appendleft(seqs)
                    worker.broken = True
                    break
                if not worker.pending:
                    worker.started = time.monotonic()
                worker.pending.append(deque(seqs))

    def _collect(self, todo: deque[list[int]], results: dict[int, tuple[bool, Any]]) -> None:
        """Wait for the next report of any worker; handle deaths and overruns."""
        by_handle: dict[Any, _Worker] = {}
        for worker in self._pool:
            by_handle[worker.conn] = worker
            by_handle[worker.process.sentinel] = worker
        timeout = None
        if self.timeout_s is not None:
            busy = [w.started + self.timeout_s for w in self._pool if w.pending]
            timeout = max(0.0, min(busy) - time.monotonic()) if busy else None
        for handle in wait(list(by_handle), timeout=timeout):
            worker = by_handle[handle]
            if worker not in self._pool:
                continue  # replaced while handling an earlier handle
            if handle is worker.conn:
                self._receive(worker, todo, results)
            elif not worker.conn.poll():
                self._replace(worker, todo, results, None)
        if self.timeout_s is not None:
            now = time.monotonic()
            for worker in list(self._pool):
                if worker.pending and now - worker.started > self.timeout_s:
                    self._replace(worker, todo, results, timeout_failure(self.timeout_s))

    def _receive(self, worker: _Worker, todo: deque[list[int]], results: dict[int, tuple[bool, Any]]) -> None:
        try:
            kind, seq, value = worker.conn.recv()
        except (EOFError, OSError):  # died
            self._replace(worker, todo, results, None)
            return
        if kind == "ready":
            worker.ready = True
            return
        current = worker.pending[0]
        current.popleft()  # == seq: a worker reports its items in the order it was sent them
        if not current:
            worker.pending.popleft()
        worker.started = time.monotonic()
        results[seq] = (True, value) if kind == "ok" else (False, WorkFailure("worker_error", value))

    def _replace(self, worker: _Worker, todo: deque[list[int]], results: dict[int, tuple[bool, Any]],
                 failure: WorkFailure | None) -> None:
        """End ``worker``: its current item fails with ``failure`` (None: it died, and how it
        died is the failure), its other items go back first."""
        self._stop(worker, wait_s=0 if failure else 10)
        if failure is None:
            failure = WorkFailure("worker_died", exit_description(worker.process.exitcode))
        if not worker.ready:
            raise RuntimeError(f"a worker process {failure.detail} before it could start work "
                               "(it could not be started with its function and shared arguments)")
        self._pool.remove(worker)
        unfinished = [seq for seqs in worker.pending for seq in seqs]
        if unfinished:
            results[unfinished[0]] = (False, failure)
            put_back(todo, unfinished[1:], chunk=CHUNK_MAX)
        self._pool.append(self._start())


def ordered_map(function: Callable[..., R], items: Iterable[T], *, workers: int,
                on_failure: Callable[[T, WorkFailure], R], timeout_s: float | None = None,
                shared_args: tuple = ()) -> Iterator[R]:
    """``function(item, *shared_args)`` for each item, over ``workers`` forked processes, in input
    order.

    Results come back as they are ready but in order, so outputs are the same bytes for any number
    of workers; chunks amortise the inter-process round trip. ``shared_args`` travel once to each
    worker process (on a cluster, scattered once), not with every chunk: large read-only data goes
    that way, as an argument, so no worker keeps state of its own between runs. An item whose worker
    dies, runs past ``timeout_s`` seconds or raises gets ``on_failure(item, WorkFailure)`` instead;
    its worker is replaced. Even with one worker the work runs in a child process, so this process
    survives any item.

    With ``DASK_SCHEDULER_ADDRESS`` set, the items run on that Dask cluster instead, under the
    same contract (:mod:`dicomflow.runtime.cluster`), and ``workers`` is the cluster's business.
    Both engines plan the work the same way (:mod:`dicomflow.runtime.planning`).
    """
    address = scheduler_address()
    if address is not None:
        yield from cluster_map(function, items, address=address, on_failure=on_failure,
                               timeout_s=timeout_s, shared_args=shared_args)
        return
    with WorkerPool(function, workers=workers, shared_args=shared_args,
                    timeout_s=timeout_s) as pool:
        yield from pool.map(items, on_failure=on_failure)
