"""Benchmark: what DP-SGD costs on BreastMNIST (issue 28, item 6): test AUC, membership attack, time.

BreastMNIST (``../shared/medmnist/breastmnist.npz``, official split 546/78/156; ``--npz`` any
MedMNIST-format file) is trained in-process with :func:`dicomflow.model.training.train_model`:
non-private, and by DP-SGD (``train.privacy``, :mod:`dicomflow.model.privacy`) at each target ε,
with the same architecture (``resnet_small_gn``: DP-SGD refuses batch normalisation), so that the
comparison is of DP itself. Each run reports the test ROC AUC and accuracy (at 0.5), the
validation AUC of its kept epoch, ε as the accountant states it for the steps that ran, σ, the
steps, the seconds per epoch (mean over the epochs after the first, whose graph tracing is not
training) and a loss-threshold membership attack's AUC.

The attack (Yeom et al., 2018): members are a seeded sample of training images as many as the
test split, non-members the test split; each image's score is minus its cross-entropy under the
model; the attack AUC is the ROC AUC of that score for member against non-member (0.5: the model
tells nothing about membership). It is computed here (``dicomflow.evaluation`` has no attack yet).

Every choice of the recipe is made on validation, never on test: :data:`RECIPE` (the issue's
setting, batch 64, 30 epochs, δ = 1e-3) and ``--set`` on top; ``--tune`` trains at the largest ε,
first seed, for each (lr, max_grad_norm) of :data:`TUNING` and prints their validation AUC.

    .venv/bin/python -m bench.privacy [--npz PATH] [--per-split N] [--epsilons 1 3 8]
        [--seeds 42 43 44] [--no-baseline] [--set KEY=VALUE ...] [--tune] [--json FILE]
    .venv/bin/python -m bench.privacy --summarise RUNS.json [...]   # the table of earlier runs

Targets (2 CPU cores): DP at most 5x the non-private seconds per epoch; at ε = 8 the mean test
AUC within 0.06 of the non-private model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Column, Report, add_output_args, code_version

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NPZ = ROOT.parent / "shared" / "medmnist" / "breastmnist.npz"
EPSILONS = (1.0, 3.0, 8.0)
SEEDS = (42, 43, 44)
ATTACK_SEED = 2028  # which training images stand for the members; not a training seed
# The setting; train params not named here are the project's params.yaml.
RECIPE: dict[str, Any] = {
    "architecture": "resnet_small_gn", "epochs": 30, "batch_size": 64, "lr": 0.001,
    "lr_schedule": "constant", "early_stopping_patience": 0, "keep": "best_val_loss",
    "calibration": "temperature", "ensemble": 1, "class_weight": "none",
    "privacy.delta": 1e-3, "privacy.max_grad_norm": 1.0, "privacy.accountant": "pld",
}
# (lr, max_grad_norm) tried on validation with --tune, at the largest ε and the first seed.
TUNING = ((0.001, 1.0), (0.003, 1.0), (0.003, 0.5), (0.01, 1.0))
MAX_SLOWDOWN, MAX_AUC_GAP = 5.0, 0.06


def read_npz(path: Path, per_split: int | None = None) -> dict[str, np.ndarray]:
    """``{split}_x`` float32 (n, h, w, c) in [0, 1] and ``{split}_y`` int (n,) of train, val and
    test; with ``per_split``, the first ``per_split`` images of each split."""
    arrays = {}
    with np.load(path) as data:
        for split in ("train", "val", "test"):
            images = data[f"{split}_images"][:per_split].astype(np.float32) / 255.0
            arrays[f"{split}_x"] = images[..., None] if images.ndim == 3 else images
            arrays[f"{split}_y"] = data[f"{split}_labels"].reshape(-1)[:per_split].astype(np.int64)
    return arrays


def train_params(sets: dict[str, Any], *, seed: int, epsilon: float | None):
    """The project's ``train`` params with :data:`RECIPE`, ``sets`` (dotted keys, ``privacy.``
    for the nested ones), the seed and ``epsilon`` (None: privacy off) applied."""
    from dicomflow.config.params import load_params

    base = load_params("train")
    values = {**RECIPE, **sets}
    privacy = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("privacy.")}
    privacy.update(enabled=epsilon is not None, target_epsilon=epsilon if epsilon is not None else 8.0)
    top = {k: v for k, v in values.items() if not k.startswith("privacy.")}
    return dataclasses.replace(base, **top, seed=seed, privacy=dataclasses.replace(base.privacy, **privacy))


def attack_auc(model, data: dict[str, np.ndarray], *, seed: int = ATTACK_SEED) -> float:
    """The loss-threshold membership attack's ROC AUC: a seeded sample of training images as many
    as the test split (members) against the test split (non-members), scored by minus each image's
    cross-entropy."""
    from sklearn.metrics import roc_auc_score

    from dicomflow.model.architectures import predict_probabilities

    n = min(len(data["test_y"]), len(data["train_y"]))
    members = np.sort(np.random.default_rng(seed).choice(len(data["train_y"]), n, replace=False))
    x = np.concatenate([data["train_x"][members], data["test_x"]])
    y = np.concatenate([data["train_y"][members], data["test_y"]])
    p = np.clip(predict_probabilities(model, x), 1e-7, 1 - 1e-7)
    loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(roc_auc_score(np.r_[np.ones(n), np.zeros(len(data["test_y"]))], -loss))


def run_one(data: dict[str, np.ndarray], params) -> dict[str, Any]:
    """Train once with ``params``; the figures of one record (test, validation, attack, privacy, time)."""
    from dicomflow.config.params import load_params
    from dicomflow.model import scoring
    from dicomflow.model.architectures import predict_probabilities
    from dicomflow.model.privacy import privacy_guarantee
    from dicomflow.model.training import train_model

    clock = [time.perf_counter()]
    model, history = train_model(data["train_x"], data["train_y"], data["val_x"], data["val_y"], params=params,
                                 checkpoint=None, augment=load_params("augment"),
                                 on_epoch_end=lambda epoch, row: clock.append(time.perf_counter()))
    durations = np.diff(clock)
    test = scoring.classification_scores(data["test_y"], predict_probabilities(model, data["test_x"]))
    kept = history[history["kept"]].iloc[-1]
    n_train = len(data["train_y"])
    steps = (int(history["steps"].iloc[-1]) if "steps" in history
             else len(history) * -(-n_train // params.batch_size))
    record = {"epsilon": None, "target_epsilon": None, "seed": params.seed, "test_auc": test["auc"],
              "test_acc": test["accuracy"], "val_auc": float(kept["val_auc"]), "kept_epoch": int(kept["epoch"]),
              "attack_auc": attack_auc(model, data), "noise_multiplier": None, "steps": steps,
              "seconds_per_epoch": float(np.mean(durations[1:] if len(durations) > 1 else durations)),
              "lr": params.lr, "max_grad_norm": None}
    if params.privacy.enabled:
        guarantee = privacy_guarantee(params, n_images=n_train, steps=steps)
        record.update(epsilon=guarantee.epsilon, target_epsilon=params.privacy.target_epsilon,
                      noise_multiplier=guarantee.noise_multiplier, max_grad_norm=guarantee.max_grad_norm)
    return record


def _spread(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target ε (None first: non-private): means and SDs over the seeds."""
    rows = []
    baseline = [r["seconds_per_epoch"] for r in records if r["target_epsilon"] is None]
    for target in sorted({r["target_epsilon"] for r in records}, key=lambda t: -1 if t is None else t):
        group = [r for r in records if r["target_epsilon"] == target]
        auc, auc_sd = _spread([r["test_auc"] for r in group])
        acc, acc_sd = _spread([r["test_acc"] for r in group])
        seconds = statistics.fmean(r["seconds_per_epoch"] for r in group)
        rows.append({
            "setting": "non-private" if target is None else f"ε ≤ {target:g}",
            "epsilon": None if target is None else max(r["epsilon"] for r in group),
            "seeds": len(group), "test_auc": auc, "test_auc_sd": auc_sd, "test_acc": acc, "test_acc_sd": acc_sd,
            "val_auc": statistics.fmean(r["val_auc"] for r in group),
            "attack_auc": statistics.fmean(r["attack_auc"] for r in group),
            "noise_multiplier": group[0]["noise_multiplier"], "steps": group[0]["steps"],
            "seconds_per_epoch": seconds,
            "slowdown": seconds / statistics.fmean(baseline) if baseline else None})
    return rows


COLUMNS = (Column("setting", "setting"), Column("ε (accountant)", "epsilon", "{:.3f}"),
           Column("seeds", "seeds"), Column("test AUC", "test_auc", "{:.3f}"),
           Column("SD", "test_auc_sd", "{:.3f}"), Column("test ACC", "test_acc", "{:.3f}"),
           Column("SD", "test_acc_sd", "{:.3f}"), Column("val AUC", "val_auc", "{:.3f}"),
           Column("attack AUC", "attack_auc", "{:.3f}"), Column("σ", "noise_multiplier", "{:.3f}"),
           Column("steps", "steps"), Column("s/epoch", "seconds_per_epoch", "{:.2f}"),
           Column("x non-private", "slowdown", "{:.2f}"))
TUNE_COLUMNS = (Column("lr", "lr", "{:g}"), Column("max_grad_norm", "max_grad_norm", "{:g}"),
                Column("val AUC (kept epoch)", "val_auc", "{:.3f}"), Column("kept epoch", "kept_epoch"),
                Column("ε", "epsilon", "{:.3f}"))


def parse_sets(values: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (train keys, ``privacy.`` for the nested ones; YAML values)."""
    import yaml

    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. lr=0.003 or privacy.max_grad_norm=0.5")
        pairs[key.removeprefix("train.")] = yaml.safe_load(value)
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.privacy", description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ, help="MedMNIST-format .npz (two classes)")
    parser.add_argument("--per-split", type=int, metavar="N", help="only the first N images of each split")
    parser.add_argument("--epsilons", type=float, nargs="*", default=list(EPSILONS), metavar="EPS",
                        help="target epsilons (none: the non-private runs only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), metavar="SEED")
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private runs")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a train param on top of the recipe (e.g. lr=0.003, privacy.max_grad_norm=0.5)")
    parser.add_argument("--tune", action="store_true",
                        help="only the validation search of (lr, max_grad_norm) at the largest ε, first seed")
    parser.add_argument("--summarise", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: the table and targets of the runs in earlier --json files")
    parser.add_argument("--privacy", action="store_true", help=argparse.SUPPRESS)  # from bench.medmnist
    add_output_args(parser, folders=False)
    args = parser.parse_args(argv)
    report = Report("privacy", args)
    if args.summarise:
        records = [r for path in args.summarise for r in json.loads(path.read_text())["figures"]["runs"]]
        return finish(report, records, args.json)
    if not args.npz.is_file():
        sys.exit(f"{args.npz}: not found (see ../shared/README.md, medmnist section)")
    data = read_npz(args.npz, args.per_split)
    sets = parse_sets(args.sets)
    print(f"code: {ROOT} at {code_version()}; {args.npz.name}: "
          + ", ".join(f"{s} {len(data[f'{s}_y'])}" for s in ("train", "val", "test")), file=sys.stderr)

    if args.tune:
        epsilon, records = max(args.epsilons), []
        for lr, norm in TUNING:
            params = train_params({**sets, "lr": lr, "privacy.max_grad_norm": norm}, seed=args.seeds[0],
                                  epsilon=epsilon)
            records.append(run_one(data, params))
            print(f"tune ε {epsilon:g} lr {lr:g} max_grad_norm {norm:g}: val AUC {records[-1]['val_auc']:.4f}",
                  file=sys.stderr)
        report.table("tuning", TUNE_COLUMNS, records, title=f"Validation AUC at ε ≤ {epsilon:g}, seed {args.seeds[0]}")
        report.figures["runs"] = records
        report.write(args.json)
        return

    settings = ([] if args.no_baseline else [None]) + sorted(args.epsilons)
    records = []
    for epsilon in settings:
        for seed in args.seeds:
            records.append(run_one(data, train_params(sets, seed=seed, epsilon=epsilon)))
            print("run " + json.dumps(records[-1]), file=sys.stderr)
    finish(report, records, args.json)


def finish(report: Report, records: list[dict[str, Any]], json_path: Path | None) -> None:
    """Print the table and the targets of ``records``; write them all to ``json_path``."""
    rows = summarise(records)
    report.table("privacy", COLUMNS, rows, title="DP-SGD against non-private training (resnet_small_gn)")
    over = [r["epsilon"] for r in records if r["epsilon"] is not None and r["epsilon"] > r["target_epsilon"] + 1e-9]
    report.target("every run's ε at most its target", not over, f"{len(over)} over")
    baseline = next((r for r in rows if r["epsilon"] is None), None)
    for row in rows:
        if baseline is not None and row is not baseline:
            report.target(f"{row['setting']}: at most {MAX_SLOWDOWN:g}x non-private per epoch",
                          row["slowdown"] <= MAX_SLOWDOWN, row["slowdown"])
    top = next((r for r in rows if r["setting"] == "ε ≤ 8"), None)
    if baseline is not None and top is not None:
        gap = baseline["test_auc"] - top["test_auc"]
        report.target(f"ε ≤ 8: test AUC within {MAX_AUC_GAP} of non-private", gap <= MAX_AUC_GAP, gap)
    report.print_targets()
    report.figures["runs"] = records
    report.write(json_path)


if __name__ == "__main__":
    main()
