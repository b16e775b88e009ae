"""95 % intervals that resample patients: a cluster bootstrap of the registry's metrics.

A test split holds several images of most patients (the embedded sample: 145 images of 49 patients),
and one patient's images are alike: the same anatomy, the same scanner, often the same call. They
are not independent draws, so an interval that resamples images (or a Wilson interval on image
counts) counts each patient several times over and comes out too narrow. The cluster bootstrap
(Davison & Hinkley, *Bootstrap Methods and their Application*, 1997, sec. 3.8; Field & Welsh,
JRSS B 2007) resamples the unit that was sampled: each resample draws the split's patients with
replacement and keeps all the images of each patient drawn, as often as it was drawn. Where every
patient has one image it is the ordinary bootstrap.

An interval is not always estimable, and then it is None with the reason, never a made-up range:

- fewer than :data:`MIN_PATIENTS` patients (the percentile interval of a handful of clusters is
  noise);
- fewer than :data:`MIN_DEFINED_SHARE` of the resamples hold every class of the set, or have the
  metric defined (PPV needs an image called positive): the others would describe another case mix;
- the interval is a point: the metric sits at its bound (AUC 1.000, specificity 1.000) in at least
  97.5 % of the resamples. A percentile bootstrap cannot see past a bound: "1.000-1.000" would claim
  a certainty that 49 patients cannot give.

The patient key is the de-identified manifest's ``patient_key`` (the column the split stage groups
by), passed in as values: this module reads no files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dicomflow import metrics as registry
from dicomflow.errors import DataError
from dicomflow.metrics import Scores

N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 0  # fixed: the same scores give the same report
MIN_PATIENTS = 10
MIN_DEFINED_SHARE = 0.9
# Interval ends are stored to 4 decimals: 1000 resamples do not fix the 5th, and a stored
# 0.9999999999999999 reads as a figure below 1.
DIGITS = 4
NOT_ESTIMABLE = "not estimable"


@dataclass(frozen=True)
class Interval:
    """A metric's interval, or why there is none.

    Attributes
    ----------
    low, high : float or None
        The ends, rounded to :data:`DIGITS` decimals and inside the metric's bounds; None when not
        estimable.
    note : str
        "" when estimated; else ``"not estimable: <why>"``.
    """

    low: float | None
    high: float | None
    note: str = ""

    @classmethod
    def not_estimable(cls, why: str) -> Interval:
        return cls(None, None, f"{NOT_ESTIMABLE}: {why}")

    @property
    def estimated(self) -> bool:
        return self.low is not None and self.high is not None

    def describe(self, digits: int = 3) -> str:
        """``0.912-0.987``, or the note."""
        return f"{self.low:.{digits}f}-{self.high:.{digits}f}" if self.estimated else self.note

    def as_report(self, name: str) -> dict[str, float | str | None]:
        """``<name>_ci_low``, ``<name>_ci_high`` and ``<name>_ci_note``, as the report stores them."""
        return {f"{name}_ci_low": self.low, f"{name}_ci_high": self.high, f"{name}_ci_note": self.note}


def interval_from_report(report: dict, name: str) -> Interval | None:
    """The interval of ``name`` stored in ``report`` by :meth:`Interval.as_report` (None if it has
    none: a report of an older version)."""
    low, high = report.get(f"{name}_ci_low"), report.get(f"{name}_ci_high")
    note = report.get(f"{name}_ci_note")
    note = "" if note is None or (isinstance(note, float) and np.isnan(note)) else str(note)
    if _missing(low) or _missing(high):
        return Interval(None, None, note) if note else None
    return Interval(float(low), float(high), note)


def patient_codes(patients: Sequence | np.ndarray, n_images: int) -> np.ndarray:
    """Per image, an integer code of its patient (0 to the number of patients - 1).

    Raises
    ------
    DataError
        Not one key per image, or a key missing.
    """
    keys = pd.Series(np.asarray(patients, dtype=object))
    if len(keys) != n_images:
        raise DataError(f"patients holds {len(keys)} keys for {n_images} images; pass the manifest's "
                        "patient_key of each image, in the images' order")
    missing = int((keys.isna() | (keys.astype(str).str.strip() == "")).sum())
    if missing:
        raise DataError(f"patient_key is missing for {missing} of {n_images} images; intervals resample "
                        "patients: rerun deidentify and split so that every image has its patient key")
    return np.unique(keys.astype(str).to_numpy(), return_inverse=True)[1].ravel()


def patient_bootstrap(scores: Scores, patients: Sequence | np.ndarray, names: Sequence[str], *,
                      n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL,
                      min_patients: int = MIN_PATIENTS) -> dict[str, Interval]:
    """Percentile intervals of registry metrics, resampling patients (a cluster bootstrap).

    Parameters
    ----------
    scores : Scores
        The images' labels, probabilities and calls.
    patients : array-like of shape (n,)
        Each image's patient key (the manifest's ``patient_key``).
    names : sequence of str
        Registry metrics (:data:`dicomflow.metrics.METRICS`).
    n_resamples, seed, level : int, int, float
        Resamples drawn (each draws as many patients as the set has, with replacement, and keeps
        all their images), the generator's seed, and the interval's coverage.
    min_patients : int
        Fewer patients than this: not estimable.

    Returns
    -------
    dict of str to Interval
        Per name; :meth:`Interval.not_estimable` with the reason where the bootstrap cannot give
        one (see the module's docstring).

    Raises
    ------
    DataError
        ``patients`` is not one key per image, or a key is missing.

    Notes
    -----
    A resample is used only when it holds every class of the set (as the AUC needs), and for a
    metric only where the metric is defined (:attr:`dicomflow.metrics.Metric.defined`). Every
    metric is computed on the same resamples.
    """
    n_images = len(scores.labels)
    code = patient_codes(patients, n_images)
    n_patients = int(code.max()) + 1 if n_images else 0
    of = f"{n_patients} patient{'s' if n_patients != 1 else ''}"
    if n_patients < min_patients:
        return {name: Interval.not_estimable(f"{of}, fewer than the {min_patients} an interval needs")
                for name in names}
    chosen = {name: registry.METRICS[name] for name in names}
    n_classes = len(np.unique(scores.labels))
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in names}
    usable = 0
    for _ in range(n_resamples):
        times = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)
        # Each image as often as its patient was drawn: the metrics read a set, not an order.
        rows = np.repeat(np.arange(n_images), times[code])
        labels = scores.labels[rows]
        if len(np.unique(labels)) < n_classes:
            continue
        usable += 1
        # replace, not a new Scores: the resample keeps the task, referable grade and threshold.
        sample = dataclasses.replace(scores, labels=labels, probabilities=scores.probabilities[rows],
                                     called=scores.called[rows])
        for name, metric in chosen.items():
            if metric.defined is None or metric.defined(sample):
                draws[name].append(metric.compute(sample))
    needed = MIN_DEFINED_SHARE * n_resamples
    intervals = {}
    for name, metric in chosen.items():
        values = np.asarray(draws[name], dtype=float)
        if usable < needed:
            intervals[name] = Interval.not_estimable(
                f"only {usable} of {n_resamples} resamples of {of} hold every class")
        elif len(values) < needed:
            intervals[name] = Interval.not_estimable(
                f"{metric.undefined or 'undefined'} in {n_resamples - len(values)} of {n_resamples} "
                f"resamples of {of}")
        else:
            intervals[name] = _percentile_interval(values, metric.bounds, level=level, of=of,
                                                   left_out=n_resamples - len(values))
    return intervals


def _percentile_interval(values: np.ndarray, bounds: tuple[float, float], *, level: float, of: str,
                         left_out: int = 0) -> Interval:
    """The percentile interval of bootstrap ``values``, or not estimable when it is a point
    (``left_out``: resamples not in ``values``, said in the reason)."""
    tail = (1 - level) / 2
    low, high = (round(float(np.clip(np.quantile(values, q), *bounds)), DIGITS) for q in (tail, 1 - tail))
    if low < high:
        return Interval(low, high)
    more = f" ({left_out} more left out: a class missing or the metric undefined)" if left_out else ""
    if np.all(values == values[0]):
        return Interval.not_estimable(f"{values[0]:.3f} in every one of {len(values)} resamples of {of}{more}")
    at = int(np.sum(np.round(values, DIGITS) == low))
    return Interval.not_estimable(f"{low:.3f} in {at} of {len(values)} resamples of {of}{more}, so the "
                                  f"{level:.0%} interval is a point")


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))
