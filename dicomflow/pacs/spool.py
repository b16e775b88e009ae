"""The listener's spool: received instances, their results waiting to be stored, and what became of
each, on disk so that nothing acknowledged is lost when the process stops or crashes.

Layout (``dicomflow listen --spool DIR``; every folder mode 0700, every file 0600: the received
images are patient data)::

    DIR/
      incoming/      being written (a temporary name); removed at start: never acknowledged
      received/      acknowledged instances waiting to be scored, as received (``NAME.dcm``)
      failed/        received instances that could not be scored, kept for inspection
      rejected/NAME/ result sets the destination refused again and again (not tried again)
      outbox/NAME/   one instance's result objects (SR, SEG) waiting to be stored at the destination
      outbox/.NAME.part/  results being moved in; removed at start (the instance is scored again)
      work/          the scorer's scratch, emptied at start
      outcomes.csv   one row per received instance once scored: NAME, calling AE, status, error, ...
      sent.csv       one row per result set stored at the destination

``NAME`` is ``<UTC time received>-<calling AE title>-<random>``: it sorts in arrival order and
holds no value read from the instance (no UID, no patient data). A file gets its final name only
once it is whole and on disk (written, ``fsync``-ed, renamed, its folder ``fsync``-ed), so every
file under ``received/`` and every folder under ``outbox/`` is complete.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

OUTCOME_COLUMNS = ("file", "calling_ae", "received_at", "scored_at", "status", "label", "error", "objects")
SENT_COLUMNS = ("file", "sent_at", "objects")
PART = ".part"
SUFFIX = ".dcm"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Outcome:
    """What became of one received instance: ``status`` ``scored`` (its results are in the outbox)
    or ``failed`` (``error``: the reason code and the reader's words, as ``dicomflow predict``
    writes them); ``objects`` the result objects written."""

    name: str
    status: str
    label: str = ""
    error: str = ""
    objects: int = 0


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename in it), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Spool:
    """The folders of one spool (made when missing) and the operations that keep them consistent.

    Parameters
    ----------
    root : Path
        The spool folder (``--spool``).

    Each method is safe to call from the thread that owns the step it serves: receiving (the
    association threads: :meth:`receive`), scoring (:meth:`publish`, :meth:`record`,
    :meth:`finish`) and sending (:meth:`ready`, :meth:`sent`).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.received = self.root / "received"
        self.failed = self.root / "failed"
        self.outbox = self.root / "outbox"
        self.work = self.root / "work"
        self.rejected = self.root / "rejected"
        self.outcomes_csv = self.root / "outcomes.csv"
        self.sent_csv = self.root / "sent.csv"
        for folder in (self.root, self.incoming, self.received, self.failed, self.outbox, self.work, self.rejected):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    # --- receiving ---------------------------------------------------------------------------

    @staticmethod
    def new_name(calling_ae: str) -> str:
        """A fresh instance name: time received, the calling AE title (characters other than
        letters, digits, ``_`` and ``-`` as ``_``) and 48 random bits."""
        return f"{_utc_now()}-{_UNSAFE.sub('_', calling_ae.strip()) or '_'}-{secrets.token_hex(6)}"

    def receive(self, name: str, content: bytes) -> Path:
        """Write one received instance whole: a temporary file under ``incoming/``, ``fsync``,
        renamed to ``received/NAME.dcm``, the folder ``fsync``-ed; its path. Call before the
        C-STORE success is sent. OSError (a full disk) leaves nothing under ``received/``."""
        temporary = self.incoming / f"{name}{PART}"
        final = self.received / f"{name}{SUFFIX}"
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(content)
                while view:
                    view = view[os.write(descriptor, view):]
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.replace(temporary, final)
            _fsync(self.received)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        return final

    # --- restart -----------------------------------------------------------------------------

    def recover(self) -> list[Path]:
        """Make the spool consistent after a stop or a crash, and return the received instances
        still to score, in arrival order.

        Removes what was never acknowledged or is half made (``incoming/``, ``work/``,
        ``outbox/.NAME.part``); an instance whose outcome is recorded, or whose results are in the
        outbox or were sent (the process stopped between the steps of :meth:`publish`,
        :meth:`record` and :meth:`finish`), is finished, not scored again.
        """
        for entry in self.incoming.iterdir():
            entry.unlink()
        for entry in self.work.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in self.outbox.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(PART):
                shutil.rmtree(entry)
        recorded = {row["file"]: row["status"] for row in self._rows(self.outcomes_csv)}
        published = {entry.name for entry in self.outbox.iterdir() if not entry.name.startswith(".")}
        published |= {row["file"] for row in self._rows(self.sent_csv)}
        waiting = []
        for path in sorted(self.received.glob(f"*{SUFFIX}")):
            name = path.name.removesuffix(SUFFIX)
            if name in recorded:
                self.finish(name, failed=recorded[name] == "failed")
            elif name in published:
                self.record([Outcome(name, "scored", objects=len(list((self.outbox / name).glob("*"))))])
                self.finish(name, failed=False)
            else:
                waiting.append(path)
        return waiting

    @staticmethod
    def _rows(table: Path) -> list[dict[str, str]]:
        if not table.is_file():
            return []
        with table.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    # --- scoring -----------------------------------------------------------------------------

    def batch_folder(self) -> Path:
        """A fresh folder under ``work/`` for one batch's result objects."""
        folder = self.work / secrets.token_hex(8)
        folder.mkdir(mode=0o700)
        return folder

    def publish(self, name: str, objects: Iterable[Path]) -> int:
        """Move one instance's result objects into ``outbox/NAME/`` whole (each file ``fsync``-ed,
        the folder made under a temporary name, renamed); how many."""
        part = self.outbox / f".{name}{PART}"
        part.mkdir(mode=0o700)
        count = 0
        for number, source in enumerate(objects):
            target = part / f"{number:02d}-{source.name}"
            shutil.move(str(source), target)
            os.chmod(target, 0o600)
            _fsync(target)
            count += 1
        _fsync(part)
        os.replace(part, self.outbox / name)
        _fsync(self.outbox)
        return count

    def record(self, outcomes: Iterable[Outcome]) -> None:
        """Append ``outcomes`` to ``outcomes.csv`` (its header first when new), ``fsync``-ed."""
        rows = [{"file": outcome.name, "calling_ae": _calling_ae(outcome.name),
                 "received_at": outcome.name.split("-", 1)[0], "scored_at": _utc_now(), "status": outcome.status,
                 "label": outcome.label, "error": outcome.error, "objects": outcome.objects} for outcome in outcomes]
        self._append(self.outcomes_csv, OUTCOME_COLUMNS, rows)

    def finish(self, name: str, *, failed: bool) -> None:
        """Done with a received instance: a scored one is removed (its results are in the outbox),
        a failed one is moved to ``failed/``."""
        path = self.received / f"{name}{SUFFIX}"
        if failed:
            os.replace(path, self.failed / path.name)
        else:
            path.unlink(missing_ok=True)

    # --- sending -----------------------------------------------------------------------------

    def ready(self) -> list[tuple[str, list[Path]]]:
        """The result sets in the outbox, oldest first: (NAME, its object files)."""
        sets = []
        for folder in sorted(self.outbox.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                sets.append((folder.name, sorted(path for path in folder.iterdir() if path.is_file())))
            except FileNotFoundError:  # sent and removed meanwhile (another thread asked)
                continue
        return sets

    def sent(self, name: str, objects: int) -> None:
        """One result set is stored at the destination: noted in ``sent.csv``, then its folder removed."""
        self._append(self.sent_csv, SENT_COLUMNS, [{"file": name, "sent_at": _utc_now(), "objects": objects}])
        shutil.rmtree(self.outbox / name, ignore_errors=True)

    def reject(self, name: str) -> None:
        """A result set the destination keeps refusing: moved to ``rejected/NAME`` (not tried again)."""
        os.replace(self.outbox / name, self.rejected / name)

    def counts(self) -> dict[str, int]:
        """How many instances wait to be scored, failed, and result sets wait to be sent."""
        return {"received": sum(1 for _ in self.received.glob(f"*{SUFFIX}")),
                "failed": sum(1 for _ in self.failed.glob(f"*{SUFFIX}")),
                "outbox": sum(1 for entry in self.outbox.iterdir() if not entry.name.startswith("."))}

    @staticmethod
    def _append(table: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
        if not rows:
            return
        new = not table.exists()
        descriptor = os.open(table, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            if new:
                writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())


def _calling_ae(name: str) -> str:
    """The calling AE title part of an instance name (as sanitised by :meth:`Spool.new_name`)."""
    return name.split("-", 1)[1].rsplit("-", 1)[0] if name.count("-") >= 2 else ""
