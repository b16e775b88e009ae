"""Patient-level, label-stratified train/validation/test split, or the split the labels file gives;
then the unlabelled images placed by their patient (:func:`place_unlabelled`)."""

from __future__ import annotations

import hashlib
import logging
import math
import warnings

import numpy as np
import pandas as pd
from sklearn.utils.multiclass import type_of_target

from dicomflow.config import layout
from dicomflow.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _take_one_fold(labels: np.ndarray, groups: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of one StratifiedGroupKFold fold holding about ``fraction`` of the rows.

    ``groups`` are sortable group names (or integer codes in the names' sorted order: the same
    fold), as scikit-learn takes them.
    """
    n_splits = max(2, round(1 / fraction))
    _, group_of_row = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_row.max()) + 1 if len(group_of_row) else 0
    if n_groups < n_splits:
        raise DataError(
            f"with {n_groups} patients a {fraction:.0%} hold-out needs at least {n_splits}; "
            "add data or raise split.val_size / split.test_size"
        )
    fold_of_group = _assign_group_folds(labels, group_of_row, n_groups, n_splits=n_splits, seed=seed)
    return fold_of_group[group_of_row] == 0


def _assign_group_folds(labels: np.ndarray, group_of_row: np.ndarray, n_groups: int, *,
                        n_splits: int, seed: int) -> np.ndarray:
    """The fold of each group, exactly as ``StratifiedGroupKFold(n_splits, shuffle=True,
    random_state=seed)`` of scikit-learn 1.9 assigns them (tests/test_split.py compares the two).

    The same greedy algorithm on the same numbers: groups shuffled by ``RandomState(seed)``, taken
    by decreasing spread of their class counts, each put in the fold whose choice keeps the
    per-class shares of the folds most even (near-ties, as ``np.isclose`` sees them: the fold with
    fewer rows). scikit-learn scores the candidate folds one at a time, about 200 us per group in
    Python: 36 s for the two folds of 100,000 patients (bench/scale.py). Here the candidate folds
    of a group are scored in one array operation, with the reductions over the same axes (so the
    same rounding) and its tie rule written out; about 50 us per group.
    """
    if type_of_target(labels) not in ("binary", "multiclass"):
        raise ValueError(f"Supported target types are: ('binary', 'multiclass'). "
                         f"Got {type_of_target(labels)!r} instead.")
    _, class_of_row, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    if np.all(n_splits > class_counts):
        raise ValueError(f"n_splits={n_splits} cannot be greater than the number of members in each class.")
    if n_splits > class_counts.min():
        warnings.warn(f"The least populated class in y has only {class_counts.min()} members, "
                      f"which is less than n_splits={n_splits}.", UserWarning, stacklevel=3)
    n_classes = len(class_counts)
    counts = np.zeros((n_groups, n_classes))
    np.add.at(counts, (group_of_row, class_of_row), 1)

    order = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(order)  # scikit-learn's check_random_state(seed)
    counts = counts[order]  # row j: the group order[j]
    by_spread = np.argsort(-np.std(counts, axis=1), kind="stable")

    fold_counts = np.zeros((n_splits, n_classes))
    fold_of_shuffled = np.empty(n_groups, dtype=np.intp)
    diagonal = np.arange(n_splits)
    for j in by_spread:
        group_counts = counts[j]
        # candidates[i]: the folds' counts with this group put in fold i.
        candidates = np.repeat(fold_counts[None], n_splits, axis=0)
        candidates[diagonal, diagonal] += group_counts
        scores = np.std(candidates / class_counts, axis=1).mean(axis=1).tolist()
        sizes = fold_counts.sum(axis=1).tolist()
        best, best_score, best_size = 0, math.inf, math.inf
        for i, (score, size) in enumerate(zip(scores, sizes)):
            # np.isclose(score, best_score) with its defaults (rtol 1e-5, atol 1e-8), as scikit-learn
            # compares; best_score is finite from the second fold on, so no infinity to handle.
            close = i > 0 and abs(score - best_score) <= 1e-8 + 1e-5 * abs(best_score)
            if score < best_score or (close and size < best_size):
                best, best_score, best_size = i, score, size
        fold_counts[best] += group_counts
        fold_of_shuffled[j] = best
    fold_of_group = np.empty(n_groups, dtype=np.intp)
    fold_of_group[order] = fold_of_shuffled
    return fold_of_group


def content_groups(manifest: pd.DataFrame) -> np.ndarray:
    """Per row, an integer code of its patient, numbered in the order of the patients' content.

    A patient's content is the sorted list of its images' ``pixel_sha256`` (the SHA-256 of each
    de-identified image as stored in ``images.npy``) with their labels; the codes follow the
    SHA-256 of that list. Nothing keyed enters: the codes, and the split drawn from them, are the
    same under any de-identification secret, and tell nothing that the manifest does not.

    Patients with the very same images and labels share a code, so they stay together; any other
    patient has a code of its own.
    """
    patients = manifest["patient_key"].to_numpy()
    _, patient_of_row = np.unique(patients, return_inverse=True)
    items = (manifest["pixel_sha256"].astype(str) + ":" + manifest["label"].astype(str)).to_numpy()
    order = np.lexsort((items, patient_of_row))  # rows by patient, then by content
    starts = np.flatnonzero(np.r_[True, np.diff(patient_of_row[order]) != 0])
    digests = [hashlib.sha256("\n".join(chunk).encode()).hexdigest()
               for chunk in np.split(items[order], starts[1:])]
    _, code_of_patient = np.unique(np.array(digests, dtype=object), return_inverse=True)
    return code_of_patient[patient_of_row]


def split_by_patient(manifest: pd.DataFrame, *, val_size: float, test_size: float, seed: int) -> pd.Series:
    """Assign each image to train, val or test so that every patient lands in exactly one.

    Parameters
    ----------
    manifest : DataFrame
        Needs ``patient_key``, ``label`` and ``pixel_sha256``.
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

    Invariant: a new de-identification secret does not move any image. Patients are taken in the
    order of their content (:func:`content_groups`), not of their keyed ``patient_key``, which a
    new secret re-keys: ordered by the key, a new secret made 85 of 113 validation images
    training images of the model trained before it. The split still changes with the images
    (new data, other ``ingest`` pixel params), the labels and the ``split.*`` params.
    """
    if val_size + test_size >= 1:
        raise ValueError(
            f"val_size + test_size must be below 1 to leave a training set; got {val_size} + {test_size}"
        )
    labels = manifest["label"].to_numpy()
    groups = content_groups(manifest)
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
    DataError
        When an image has no or an unknown split, or a patient's images sit in two splits.
    """
    split = manifest["predefined_split"].fillna("").astype(str)
    invalid = manifest.loc[~split.isin(SPLITS), "image_key"]
    if len(invalid):
        raise DataError(
            f"split.method is predefined but {len(invalid)} image(s) have a split that is not one of "
            f"{', '.join(SPLITS)} (e.g. image_key {', '.join(invalid[:3])}); fill the labels file's "
            "`split` column or use split.method: patient_stratified"
        )
    per_patient = split.groupby(manifest["patient_key"]).nunique()
    leaking = per_patient[per_patient > 1].index
    if len(leaking):
        raise DataError(
            f"the predefined split puts {len(leaking)} patient(s) in more than one split "
            f"(e.g. patient_key {', '.join(leaking[:3])}); their images would leak between sets"
        )
    return split.rename("split")


def place_unlabelled(manifest: pd.DataFrame, labelled_split: pd.Series) -> pd.Series:
    """The split of every row: the labelled rows' from ``labelled_split``, the unlabelled rows'
    from their patient's.

    Parameters
    ----------
    manifest : DataFrame
        Needs ``patient_key`` and ``label``; unlabelled rows have label ``layout.UNLABELLED_LABEL``.
    labelled_split : Series
        The split (train / val / test) of the labelled rows, indexed like them: the result of
        :func:`split_by_patient` or :func:`use_predefined_split` on those rows alone.

    Returns
    -------
    Series named ``split``, aligned with ``manifest``: the labelled rows' split unchanged; an
    unlabelled image of a patient whose labelled images are in train, or who has none, is
    ``layout.UNLABELLED_SPLIT``; one of a validation or test patient is ``layout.UNUSED_SPLIT``.

    Notes
    -----
    Invariant: a patient stays in one place. Pretraining sees train and unlabelled images, never
    an image of a validation or test patient, whose other images would then be scored by a model
    that has seen that patient (checked before returning).
    """
    is_unlabelled = (manifest["label"] == layout.UNLABELLED_LABEL).to_numpy()
    labelled_index = manifest.index[~is_unlabelled]
    if not labelled_split.index.equals(labelled_index):
        raise ValueError(f"labelled_split must be indexed like the manifest's {len(labelled_index)} labelled "
                         f"rows; got {len(labelled_split)} rows indexed otherwise")
    split = pd.Series(np.full(len(manifest), layout.UNLABELLED_SPLIT, dtype=object), index=manifest.index,
                      name="split")
    split[~is_unlabelled] = labelled_split.to_numpy()
    patients = manifest["patient_key"]
    held_out = set(patients[~is_unlabelled & split.isin(("val", "test")).to_numpy()])
    split[is_unlabelled & patients.isin(held_out).to_numpy()] = layout.UNUSED_SPLIT

    # Only the unlabelled images' placement is this function's: a predefined split may put one
    # patient's labelled images in train and test, which is the labels file's choice.
    placed = set(patients[(split == layout.UNLABELLED_SPLIT).to_numpy()])
    if placed & held_out:  # would mean a bug above, never bad input
        raise AssertionError("a validation or test patient has unlabelled images that pretraining may use")
    return split


def count_by_split(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per split and label (unlabelled and unused images: label
    ``layout.UNLABELLED_LABEL``, in splits ``layout.UNLABELLED_SPLIT`` and ``layout.UNUSED_SPLIT``)."""
    counts = manifest.groupby(["split", "label"]).agg(
        images=("image_key", "size"), patients=("patient_key", "nunique")
    )
    return counts.reset_index()
