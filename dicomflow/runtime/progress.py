"""Progress of a long step: a bar on a terminal, a log line now and then anywhere else.

On a terminal tqdm redraws one line with carriage returns; written to a file (``dvc repro > log``,
CI) those carriage returns and redraws end up in the log as they are. Away from a terminal a step
instead logs one line every :data:`LOG_EVERY_S` seconds and one when it ends (none for a step
shorter than that): counts and rates only, since the items' names (paths) can hold accession
numbers.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


def progress(items: Iterable[T], *, total: int, what: str, unit: str = "file",
             stream: TextIO | None = None, every_s: float = LOG_EVERY_S) -> Iterator[T]:
    """Yield ``items`` while showing how far along they are.

    Parameters
    ----------
    items : iterable
        The work, consumed lazily.
    total : int
        How many items to expect.
    what : str
        The step's name, first on the bar or the line ("ingest", "deidentify").
    unit : str, default="file"
        What an item is, for the counts.
    stream : file, optional
        Where the bar goes; ``sys.stderr`` when None. A bar only when it is a terminal.
    every_s : float, default=LOG_EVERY_S
        Away from a terminal, the seconds between two log lines.
    """
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, unit=unit, desc=what, mininterval=2.0, file=stream)
        return
    start = last = time.monotonic()
    done = 0
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_s and done < total:
            logger.info("%s: %d of %d %ss (%.0f%%), %.1f %ss/s", what, done, total, unit,
                        100 * done / max(total, 1), done / max(now - start, 1e-9), unit)
            last = now
    if last > start:  # a long step said how far it was: it says that it ended too
        logger.info("%s: %d of %d %ss in %.0f s", what, done, total, unit, time.monotonic() - start)
