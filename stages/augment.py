"""Stage 5, augment: the augmentation policy, shown as a preview grid before anything trains on it.

Inputs: ``paths.deid_dir``/images.npy and the split manifest (``paths.split_dir``).
Outputs: ``paths.augment_preview``, a PNG grid: training images, each next to variants the policy
draws for it (volumes, ``ingest.unit: series``: augmented whole in 3-D, their central axial slice shown).
Params: every key of ``augment``.

The policy is applied on the fly, batch by batch, inside the train stage's ``tf.data`` pipeline
(:func:`dicomflow.model.training.training_batches`), so every epoch sees new variants and nothing is
stored. Each transform does one thing (in the manner of MONAI's transforms) and draws its random
values with TensorFlow's stateless ops from the seed it is given: the same seed gives the same
pixels in any thread, on any number of workers, and again when a killed run resumes.
Validation and test images are never augmented.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow.config import layout
from dicomflow.config.params import load_params
from dicomflow.model.augment import build_policy, write_preview
from dicomflow.runtime.stage import run_stage

logger = logging.getLogger(__name__)


def main() -> None:
    paths, params = load_params("paths"), load_params("augment")
    manifest = pd.read_parquet(Path(paths.split_dir) / layout.SPLIT_MANIFEST)
    images = np.load(Path(paths.deid_dir) / layout.IMAGES, mmap_mode="r")
    train_rows = layout.split_rows(manifest, "train")
    policy = build_policy(params)
    # Stored volumes (ingest.unit: series) are (n, d, h, w, 1); images (n, h, w) or (n, h, w, 3).
    write_preview(np.asarray(images[train_rows[:6]]), policy, Path(paths.augment_preview), seed=params.seed,
                  volumes=images.ndim == 5)
    logger.info("augmentation policy: %s", ", ".join(type(t).__name__ for t in policy) or "none")


if __name__ == "__main__":
    run_stage(main)
