"""Keyed digests of the identifying values: the leak scan after de-identification, without the values.

No stage after deidentify may read ``data/`` or ingest's index (both hold PHI), yet evaluate must
search its MLflow run for the sources' identifying values before it registers a model. So
deidentify writes every value the scanner looks for as a keyed digest (:func:`write_digests`),
and :class:`DigestedIdentifiers` answers the scanner's lookups by digesting each candidate read
from the scanned text: :meth:`Identifiers.first` runs unchanged on it.

The key is derived from the de-identification secret (HMAC-SHA256), so the file reveals nothing
to whoever lacks the secret, not even whether a given name is in the data set: a plain or salted
hash would, since names and dates are few enough to try them all. Digests are 64 bits; a chance
match of one looked-up word against n values has odds of about n / 2**64.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from dicomflow.deid.identifiers import Identifiers, fold, is_unsegmented

FORMAT_VERSION = 1
DIGEST_HEX = 16  # 64 bits
_KEY_LABEL = b"dicomflow identifier digests"
_CHECK_VALUE = "dicomflow: the secret deidentify used"
_SEPARATOR = "\x1f"  # joins a phrase's words: never inside a folded word


def digest_key(secret: bytes) -> bytes:
    """The key of the digests, derived from ``secret`` so that it is never the pseudonym key."""
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


def digest(key: bytes, value: str | tuple[str, ...]) -> str:
    """The digest of one value (a phrase: its words joined)."""
    text = _SEPARATOR.join(value) if isinstance(value, tuple) else value
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:DIGEST_HEX]


class DigestMap(Mapping):
    """A mapping from values to sources that holds only digests: ``value in digests`` and
    ``digests[value]`` digest the value first. It cannot list its values (iteration gives digests)."""

    def __init__(self, key: bytes, by_digest: dict[str, str]) -> None:
        self._key, self._by_digest = key, by_digest

    def __contains__(self, value: object) -> bool:
        return isinstance(value, (str, tuple)) and digest(self._key, value) in self._by_digest

    def __getitem__(self, value: str | tuple[str, ...]) -> str:
        return self._by_digest[digest(self._key, value)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)


class DigestedIdentifiers(Identifiers):
    """:class:`Identifiers` read back from a digest file: finds what the values would find."""

    def __init__(self, key: bytes, saved: dict) -> None:
        maps = {kind: DigestMap(key, saved[kind]) for kind in ("names", "words", "phrases", "dates", "phones")}
        super().__init__(**maps, unsegmented={}, encodings=set(saved["encodings"]))
        self._firsts = DigestMap(key, dict.fromkeys(saved["phrase_firsts"], ""))
        self._lengths = sorted(saved["phrase_lengths"])
        self._unsegmented = {int(length): DigestMap(key, values) for length, values in saved["unsegmented"].items()}

    def __len__(self) -> int:
        return super().__len__() + sum(len(values) for values in self._unsegmented.values())

    @property
    def _phrase_index(self) -> tuple[DigestMap, list[int]]:
        return self._firsts, self._lengths

    def first(self, text: str, *, dates_and_numbers: bool = True, names: bool = True) -> str | None:
        found = super().first(text, dates_and_numbers=dates_and_numbers, names=names)
        folded = fold(text)
        if found is None and self._unsegmented and is_unsegmented(folded):
            # Names in scripts written without spaces match anywhere: every substring of each length.
            compact = folded.replace(" ", "")
            for length, values in self._unsegmented.items():
                for start in range(len(compact) - length + 1):
                    if compact[start:start + length] in values:
                        return values[compact[start:start + length]]
        return found


def write_digests(identifiers: Identifiers, secret: bytes, path: Path) -> None:
    """Write ``identifiers`` to ``path`` as digests under the key derived from ``secret``."""
    key = digest_key(secret)

    def digested(values: Mapping) -> dict[str, str]:
        return {digest(key, value): source for value, source in values.items()}

    unsegmented: dict[str, dict[str, str]] = {}
    for value, source in identifiers.unsegmented.items():
        unsegmented.setdefault(str(len(value)), {})[digest(key, value)] = source
    saved = {
        "format": FORMAT_VERSION, "check": digest(key, _CHECK_VALUE),
        "encodings": sorted(identifiers.encodings),
        **{kind: digested(getattr(identifiers, kind)) for kind in ("names", "words", "phrases", "dates", "phones")},
        "phrase_firsts": sorted({digest(key, phrase[0]) for phrase in identifiers.phrases}),
        "phrase_lengths": sorted({len(phrase) for phrase in identifiers.phrases}),
        "unsegmented": unsegmented,
    }
    path.write_text(json.dumps(saved, sort_keys=True) + "\n", encoding="utf-8")


def read_digests(path: Path, secret: bytes) -> DigestedIdentifiers:
    """The digests at ``path``; ValueError when they were written under another secret (a scan
    with the wrong key would find nothing, silently)."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    key = digest_key(secret)
    if saved.get("format") != FORMAT_VERSION or not hmac.compare_digest(saved["check"], digest(key, _CHECK_VALUE)):
        raise ValueError(f"{path} was written with another de-identification secret (or format) than "
                         "this process has: set DICOMFLOW_SECRET or DICOMFLOW_SECRET_FILE as for deidentify")
    return DigestedIdentifiers(key, saved)
