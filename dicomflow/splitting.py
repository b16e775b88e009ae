"""Patient-level, label-stratified train/validation/test split, or the split the labels file gives."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from dicomflow.runtime.stage import StageError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _take_one_fold(labels: np.ndarray, groups: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of one StratifiedGroupKFold fold holding about ``fraction`` of the rows."""
    n_splits = max(2, round(1 / fraction))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise StageError(
            f"with {n_groups} patients a {fraction:.0%} hold-out needs at least {n_splits}; "
            "add data or raise split.val_size / split.test_size"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held_out = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held_out] = True
    return mask


def split_by_patient(manifest: pd.DataFrame, *, val_size: float, test_size: float, seed: int) -> pd.Series:
    """Assign each image to train, val or test so that every patient lands in exactly one.

    Parameters
    ----------
    manifest : DataFrame
        Needs ``patient_key`` and ``label``.
    val_size, test_size : float
        Wanted shares of images; met approximately, as whole patients move between sets.
    seed : int
        Seed of the shuffling, so the split is reproducible.

    Returns
    -------
    Series of "train" / "val" / "test", aligned with ``manifest``.

    Notes
    -----
    Invariant: no ``patient_key`` appears in two splits (checked before returning). Images of one
    patient are correlated; splitting images instead of patients would leak them into the test set.
    """
    if val_size + test_size >= 1:
        raise ValueError(
            f"val_size + test_size must be below 1 to leave a training set; got {val_size} + {test_size}"
        )
    labels = manifest["label"].to_numpy()
    groups = manifest["patient_key"].to_numpy()
    is_test = _take_one_fold(labels, groups, fraction=test_size, seed=seed)
    rest = np.flatnonzero(~is_test)
    is_val_in_rest = _take_one_fold(
        labels[rest], groups[rest], fraction=val_size / (1 - test_size), seed=seed + 1
    )
    split = np.full(len(manifest), "train", dtype=object)
    split[is_test] = "test"
    split[rest[is_val_in_rest]] = "val"
    result = pd.Series(split, index=manifest.index, name="split")

    splits_per_patient = result.groupby(manifest["patient_key"]).nunique()
    if (splits_per_patient > 1).any():  # would mean a bug above, never bad input
        raise AssertionError("a patient was assigned to more than one split")
    return result


def use_predefined_split(manifest: pd.DataFrame) -> pd.Series:
    """The ``predefined_split`` column as the split, after checking it is complete and leak-free.

    Raises
    ------
    StageError
        When an image has no or an unknown split, or a patient's images sit in two splits.
    """
    split = manifest["predefined_split"].fillna("").astype(str)
    invalid = manifest.loc[~split.isin(SPLITS), "image_key"]
    if len(invalid):
        raise StageError(
            f"split.method is predefined but {len(invalid)} image(s) have a split that is not one of "
            f"{', '.join(SPLITS)} (e.g. image_key {', '.join(invalid[:3])}); fill the labels file's "
            "`split` column or use split.method: patient_stratified"
        )
    per_patient = split.groupby(manifest["patient_key"]).nunique()
    leaking = per_patient[per_patient > 1].index
    if len(leaking):
        raise StageError(
            f"the predefined split puts {len(leaking)} patient(s) in more than one split "
            f"(e.g. patient_key {', '.join(leaking[:3])}); their images would leak between sets"
        )
    return split.rename("split")


def count_by_split(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per split and label."""
    counts = manifest.groupby(["split", "label"]).agg(
        images=("image_key", "size"), patients=("patient_key", "nunique")
    )
    return counts.reset_index()
