"""Stage 4, split: patient-level, label-stratified train / validation / test split.

Inputs: the de-identified manifest (``paths.deid_dir``).
Outputs: ``paths.split_dir``/manifest.parquet (the manifest, same row order, plus a ``split``
column) and ``paths.split_counts`` (images and patients per split and label).
Params: ``split.method``, ``split.val_size``, ``split.test_size``, ``split.seed``.

Patients are drawn in the order of their images' content (``pixel_sha256``), not of their keyed
``patient_key``: a new de-identification secret re-keys every patient but moves no image between
train, validation and test, so a model trained before it is never scored on its own training images.

With ``split.method: predefined`` the labels file's ``split`` column (train / val / test, carried
through ingest and de-identification as ``predefined_split``) is honoured instead, and checked
for the same invariant: no patient in two splits.

Either way the split is drawn on the labelled images alone, so images kept without a label
(``ingest.unlabelled: pretrain``, label -1) change nothing in it. Then each unlabelled image
follows its patient: ``unlabelled`` (for pretraining) when the patient's labelled images are in
train or when it has none, ``unused`` when they are in validation or test; ``split_counts`` lists
both with label -1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from dicomflow.config import layout
from dicomflow.config.params import load_params
from dicomflow.errors import DataError
from dicomflow.runtime.outputs import staged_folder, write_text
from dicomflow.runtime.stage import run_stage
from dicomflow.splitting import (
    SPLITS,
    count_by_split,
    place_unlabelled,
    split_by_patient,
    use_predefined_split,
)

logger = logging.getLogger(__name__)


def main() -> None:
    paths, params = load_params("paths"), load_params("split")
    manifest = pd.read_parquet(Path(paths.deid_dir) / layout.DEID_MANIFEST)
    labelled = manifest[manifest["label"] != layout.UNLABELLED_LABEL]
    if params.method == "predefined":
        labelled_split = use_predefined_split(labelled)
    else:
        labelled_split = split_by_patient(labelled, val_size=params.val_size, test_size=params.test_size,
                                          seed=params.seed)
    manifest["split"] = place_unlabelled(manifest, labelled_split)
    for split in SPLITS:
        if not (manifest["split"] == split).any():
            raise DataError(f"the {split} split is empty; add data or change split.* params")

    with staged_folder(Path(paths.split_dir), what="the split manifest") as staging:
        manifest.to_parquet(staging / layout.SPLIT_MANIFEST, index=False)
    write_text(Path(paths.split_counts), count_by_split(manifest).to_csv(index=False))
    shares = labelled_split.value_counts(normalize=True)
    logger.info(
        "split %d images of %d patients: %s",
        len(labelled), labelled["patient_key"].nunique(),
        ", ".join(f"{s} {shares.get(s, 0):.1%}" for s in SPLITS),
    )
    if len(labelled) < len(manifest):
        placed = manifest["split"].value_counts()
        logger.info("%d unlabelled images: %d for pretraining, %d unused (of validation or test patients)",
                    len(manifest) - len(labelled), placed.get(layout.UNLABELLED_SPLIT, 0),
                    placed.get(layout.UNUSED_SPLIT, 0))


if __name__ == "__main__":
    run_stage(main)
