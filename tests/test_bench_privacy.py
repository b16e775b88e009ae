"""bench.privacy run tiny through bench.medmnist's ``--privacy`` hook: a synthetic MedMNIST-format
npz (40/20/20 images of two classes), one epoch, ε 8 and the non-private baseline, one seed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"epsilon", "seed", "test_auc", "test_acc", "attack_auc", "noise_multiplier", "steps",
          "seconds_per_epoch", "val_auc"}


def write_npz(path: Path) -> None:
    """Class 1 brighter than class 0, with noise: learnable, not trivially."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 20), ("test", 20)):
        labels = np.arange(n) % 2
        images = rng.normal(100 + 40 * labels[:, None, None], 30, size=(n, 28, 28))
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez(path, **arrays)


@pytest.mark.slow
def test_tiny_run_writes_one_record_per_run_within_its_epsilon(tmp_path):
    import dp_accounting
    from dp_accounting import pld

    npz, out = tmp_path / "tiny.npz", tmp_path / "privacy.json"
    write_npz(npz)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.medmnist", "--privacy", "--npz", str(npz), "--epsilons", "8",
         "--seeds", "7", "--set", "epochs=1", "--set", "batch_size=16", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| non-private |" in result.stdout and "| ε ≤ 8 |" in result.stdout

    runs = json.loads(out.read_text())["figures"]["runs"]
    assert [r["epsilon"] is None for r in runs] == [True, False]
    baseline, private = runs
    for record in runs:
        assert set(record) >= FIELDS, FIELDS - set(record)
        assert record["seed"] == 7
        assert record["steps"] == 3  # one epoch of ceil(40 / 16) steps
        assert 0.0 <= record["test_auc"] <= 1.0 and 0.0 <= record["attack_auc"] <= 1.0
        assert record["seconds_per_epoch"] > 0
    assert baseline["noise_multiplier"] is None

    # ε recomputed here with dp_accounting from the record's σ (q = 16 / 40, δ = 1e-3): at most 8.
    sigma = private["noise_multiplier"]
    assert sigma > 0
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(16 / 40, dp_accounting.GaussianDpEvent(sigma)), private["steps"])
    epsilon = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE).compose(event).get_epsilon(1e-3)
    assert epsilon <= 8.0 + 1e-3
    assert math.isclose(private["epsilon"], epsilon, rel_tol=0.01)
    assert private["epsilon"] <= 8.0
