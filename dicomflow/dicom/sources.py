"""What is under an input folder: the files to read, and every other entry with why it is not read.

    dicomflow check-names FOLDER   # lists names that are not UTF-8; exit 1 when any

Used by ingest (``data/``) and predict (any folder). A hospital export can hold more than
DICOM files: FIFOs, sockets, links that point nowhere or at themselves, folders this process
may not read, names in a legacy encoding. None of them stops a run or hangs it, and none is
dropped silently: each is listed with a reason code, the way a bad file is quarantined.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

# Listed but not failures: entries that were never meant to be read.
SKIPPED_ENTRIES = ("hidden", "empty_folder", "excluded")


@dataclass
class SourceListing:
    """Regular files to read, in path order, and the entries that are not read:
    (relative path as text, reason code, detail)."""

    files: list[Path] = field(default_factory=list)
    unread: list[tuple[str, str, str]] = field(default_factory=list)


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/``, printable even when its name is not UTF-8
    (undecodable bytes shown as ``\\xNN``: readable, not a path to open)."""
    relative = os.fsencode(path.relative_to(root).as_posix())
    return relative.decode("utf-8", errors="backslashreplace")


def is_utf8(path: Path) -> bool:
    """Whether every part of ``path`` is valid UTF-8 (Linux names are bytes; Python keeps the
    undecodable ones as lone surrogates, which no UTF-8 writer accepts)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def list_sources(root: Path, *, exclude: set[Path] = frozenset()) -> SourceListing:
    """Walk ``root``: regular files (directly or through a link) are to be read; hidden entries
    (a name starting with ``.``), names that are not UTF-8, FIFOs, sockets, devices, broken or
    looping links, links to folders outside ``root``, empty and unreadable folders, and other
    names of an ``exclude`` file are listed in ``unread`` with a reason. Folders reached through
    links are walked once each (a link back up the tree is a loop, not a hang)."""
    listing = SourceListing()
    seen_dirs: set[tuple[int, int]] = set()
    excluded = set()
    inside = os.path.realpath(root)
    for path in exclude:
        try:
            info = os.stat(path)
            excluded.add((info.st_dev, info.st_ino))
        except OSError:
            pass

    def note(path: Path, reason: str, detail: str) -> None:
        listing.unread.append((display_path(path, root), reason, detail))

    def walk(folder: Path) -> None:
        try:
            info = folder.stat()
        except OSError as err:
            note(folder, "unreadable", f"folder cannot be opened ({err.strerror})")
            return
        if (info.st_dev, info.st_ino) in seen_dirs:
            note(folder, "link_loop", "a link to a folder already walked (a loop, or a second way into it)")
            return
        seen_dirs.add((info.st_dev, info.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            note(folder, "unreadable", f"folder cannot be listed ({err.strerror})")
            return
        if not entries and folder != root:
            note(folder, "empty_folder", "an empty folder")
        for entry in entries:
            path = folder / entry.name
            if entry.name.startswith("."):
                note(path, "hidden", "hidden entry (name starts with '.'), not read")
                continue
            if not is_utf8(Path(entry.name)):
                note(path, "non_utf8_name", "the name is not valid UTF-8, which DVC and the "
                     "outputs cannot hold: rename it (README, 'File names')")
                continue
            try:
                info = os.stat(path)  # follows links
            except OSError as err:
                is_link = entry.is_symlink()
                reason = ("link_loop" if is_link and err.errno == errno.ELOOP else
                          "broken_link" if is_link else "unreadable")
                note(path, reason, f"cannot be opened ({err.strerror})")
                continue
            if (info.st_dev, info.st_ino) in excluded:
                if entry.is_symlink():  # the labels file under another name
                    note(path, "excluded", "a link to the labels file, not read as an image")
                continue
            mode = info.st_mode
            if stat.S_ISDIR(mode) and entry.is_symlink() and not _within(os.path.realpath(path), inside):
                note(path, "link_outside", "a link to a folder outside the input folder, not followed")
            elif stat.S_ISDIR(mode):
                walk(path)
            elif stat.S_ISREG(mode):
                listing.files.append(path)
            else:
                kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else
                        "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
                note(path, "not_a_file", f"a {kind}, not a regular file")

    walk(root)
    listing.files.sort()
    listing.unread.sort()
    return listing


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
