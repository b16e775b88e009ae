"""The data-scarcity curve (issue 35, item 5): ``python -m bench.medmnist --scarcity``.

A MedMNIST-format file (BreastMNIST by default) is read once and the library is called in
process, without DVC or MLflow: for each label fraction (10, 25, 50, 100 % by default) and each
seed, a stratified subset of the training labels is drawn with that seed (the rest of the training
images count as unlabelled) and one network is trained on it, from random weights (``scratch``) or
from an encoder pretrained without labels on every training image (``pretrain``: one encoder per
seed, shared by the fractions). Each network is kept on validation (``train.keep``) and scored
once on test: ROC AUC and accuracy at 0.5 (argmax, as the MedMNIST paper). At 100 % the three
networks of each init are also averaged (:func:`dicomflow.model.architectures.ensemble_of`).

Printed: every run's validation and test figures, the table of means and SDs per point beside the
MedMNIST v2 rows, and the targets. ``--png`` draws test AUC against the label fraction;
``--json`` writes one record per run (``label_fraction``, ``init``, ``seed``, ``test_auc``,
``test_acc``, ``val_auc``, ``seconds`` and more) under ``figures.records``, rewritten after every
run: a second call with the same file, fractions and params keeps the runs already recorded and
trains only the others (the scratch arm once, the pretrain arm later). ``--no-test`` leaves the
test split unread: for choosing settings on validation. ``--encoders DIR`` keeps each pretrained
encoder there and reuses it whenever the pretraining settings, seed and data are the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

INITS = ("scratch", "pretrain")
DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
# Targets of issue 35: the ensemble of three pretrained networks at 100 % of the labels, and the
# pretrained arm's lead over scratch at few labels, in units of the seeds' SD.
TARGET_ENSEMBLE_AUC, TARGET_ENSEMBLE_ACC = 0.93, 0.88
TARGET_LEAD_FRACTIONS, TARGET_LEAD_SDS = (0.1, 0.25), 2.0
# A scratch run: the transfer settings (which apply to transferred weights only) at their neutral values.
SCRATCH = {"init": "scratch", "freeze_epochs": 0, "encoder_lr_factor": 1.0}
QUICK = {"per_split": 12, "train.epochs": 2, "pretrain.epochs": 1}


# --- pure helpers -------------------------------------------------------------------------------


def stratified_subset(labels: np.ndarray, fraction: float, *, seed: int) -> np.ndarray:
    """The sorted positions of a stratified random ``fraction`` of ``labels``, drawn with ``seed``.

    Parameters
    ----------
    labels : ndarray of shape (n,)
        Class of each training image.
    fraction : float
        In (0, 1]; each class keeps ``round(fraction * n_class)`` images, at least one.
    seed : int
        Seeds the draw (``numpy.random.default_rng(seed)``); 1.0 keeps every image whatever it is.

    Returns
    -------
    ndarray of int
        Positions into ``labels``, ascending.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(len(members), max(1, round(fraction * len(members))))
        chosen.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(chosen))


def summarise(records: list[dict[str, Any]], key: str, fraction: float, init: str) -> tuple[float, float, int]:
    """Mean, SD (ddof 1; NaN for one run) and count of ``key`` over the records of one point."""
    values = np.array([r[key] for r in records if r["label_fraction"] == fraction and r["init"] == init
                       and r.get(key) is not None], float)
    if not len(values):
        return float("nan"), float("nan"), 0
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan"), len(values)


def settings_digest(settings: dict[str, Any], data: Path, per_split: int | None) -> str:
    """What a record was made with: params, data file (name and size) and subsetting; a record of
    other settings is never reused."""
    text = json.dumps({"settings": settings, "data": [data.name, data.stat().st_size], "per_split": per_split},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def draw_curve(records: list[dict[str, Any]], path: Path, *, fractions: list[float],
               paper: tuple[str, float], title: str) -> None:
    """Test AUC (mean +- SD over seeds) against the label fraction, one line per init, the
    ensembles at 100 % as points and the paper's ResNet-18 (28) as a dashed line; PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for init, colour in zip(INITS, ("tab:grey", "tab:blue")):
        points = [(f, *summarise(records, "test_auc", f, init)[:2]) for f in fractions]
        points = [(f, m, 0.0 if np.isnan(s) else s) for f, m, s in points if not np.isnan(m)]
        if points:
            x, mean, sd = (np.array(column) for column in zip(*points))
            axes.errorbar(100 * x, mean, yerr=sd, marker="o", capsize=3, color=colour, label=f"{init} (mean ± SD)")
    for init, colour in (("scratch_ensemble", "tab:grey"), ("pretrain_ensemble", "tab:blue")):
        for record in (r for r in records if r["init"] == init and r.get("test_auc") is not None):
            axes.plot(100 * record["label_fraction"], record["test_auc"], marker="*", markersize=12,
                      linestyle="", color=colour, label=init.replace("_", " "))
    axes.axhline(paper[1], linestyle="--", linewidth=1, color="tab:red", label=f"paper: {paper[0]}")
    axes.set_xscale("log")
    axes.set_xticks([100 * f for f in fractions], [f"{100 * f:g}" for f in fractions])
    axes.minorticks_off()
    axes.set_xlabel("training labels used (%)")
    axes.set_ylabel("test ROC AUC")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


# --- the runs -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """The model input of each split (float32 (n, h, w, c) in [0, 1]) and its class indices."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    source: Path
    per_split: int | None = None

    @property
    def n_classes(self) -> int:
        return int(max(int(y.max()) for y in self.y.values())) + 1


def read_data(npz: Path, per_split: int | None) -> Data:
    """The npz's splits as model input (``bench.medmnist.read_npz``, ``layout.to_model_input``)."""
    from bench.medmnist import read_npz
    from dicomflow.config.layout import to_model_input

    images, labels = read_npz(npz, per_split=per_split)
    return Data({s: to_model_input(v) for s, v in images.items()}, {s: v.astype(int) for s, v in labels.items()},
                npz, per_split)


def score(model, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """``classification_scores`` of ``model`` on one split (accuracy at 0.5 / argmax) and its
    probabilities."""
    from dicomflow.model.architectures import predict_probabilities
    from dicomflow.model.scoring import classification_scores

    probabilities = predict_probabilities(model, x)
    return classification_scores(y, probabilities), probabilities


def fine_tune_one(data: Data, subset: np.ndarray, *, train, augment, initial=None):
    """One network on the labelled ``subset`` of train, kept on val: (model, history, seconds)."""
    from dicomflow.model.training import train_model

    extra = {} if initial is None else {"initial": initial}
    start = time.perf_counter()
    model, history = train_model(data.x["train"][subset], data.y["train"][subset], data.x["val"], data.y["val"],
                                 params=train, checkpoint=None, n_classes=data.n_classes, augment=augment, **extra)
    return model, history, time.perf_counter() - start


def pretrained_encoder(data: Data, *, pretrain, architecture: str, augment,
                       cache: Path | None = None, key: str = "") -> tuple[Any, dict[str, Any]]:
    """An encoder pretrained on every training image, labels unused, and what its pretraining
    cost (seconds, epochs, last loss, load). With ``cache``, an encoder saved there under ``key``
    (the pretraining settings' digest) is loaded instead of pretrained again, and a new one saved."""
    import keras

    from dicomflow.model.pretraining import pretrain_encoder  # lands with the pretrain stage

    saved, facts = (None, None) if cache is None else (cache / f"encoder-{key}.keras", cache / f"encoder-{key}.json")
    if saved is not None and saved.is_file() and facts.is_file():
        return keras.models.load_model(saved, compile=False), json.loads(facts.read_text(encoding="utf-8"))
    start = time.perf_counter()
    encoder, history = pretrain_encoder(data.x["train"], params=pretrain, architecture=architecture, augment=augment)
    cost = {"pretrain_seconds": round(time.perf_counter() - start, 1), "pretrain_epochs": int(len(history)),
            "pretrain_first_loss": float(history["loss"].iloc[0]) if "loss" in history else None,
            "pretrain_final_loss": float(history["loss"].iloc[-1]) if "loss" in history else None,
            "pretrain_final_top1": float(history["positive_top1"].iloc[-1]) if "positive_top1" in history else None,
            "pretrain_load_1min": round(os.getloadavg()[0], 2)}
    if saved is not None:
        cache.mkdir(parents=True, exist_ok=True)
        encoder.save(saved)
        facts.write_text(json.dumps(cost), encoding="utf-8")
    return encoder, cost


def run_record(*, fraction: float, init: str, seed: int, subset: np.ndarray, model, history, seconds: float,
               data: Data, with_test: bool, digest: str, **extra: Any) -> tuple[dict[str, Any], np.ndarray | None]:
    """One run's record (validation figures always, test ones unless ``with_test`` is False) and
    its test probabilities."""
    val, _ = score(model, data.x["val"], data.y["val"])
    test, probabilities = score(model, data.x["test"], data.y["test"]) if with_test else ({}, None)
    kept = history.loc[history["kept"], "epoch"].astype(int).tolist() if "kept" in history else []
    record = {"label_fraction": fraction, "init": init, "seed": seed, "n_labelled": int(len(subset)),
              "test_auc": test.get("auc"), "test_acc": test.get("accuracy"), "val_auc": val["auc"],
              "val_loss": val["loss"], "val_acc": val["accuracy"], "kept_epoch": kept[0] if kept else None,
              "epochs_run": int(len(history)), "seconds": round(seconds, 1),
              "load_1min": round(os.getloadavg()[0], 2), "settings": digest, **extra}
    return record, probabilities


def ensemble_record(members: list, *, init: str, seeds: list[int], data: Data, with_test: bool,
                    digest: str, n_labelled: int) -> dict[str, Any]:
    """The members' probabilities averaged (``ensemble_of``), scored on val and test."""
    from dicomflow.model.architectures import ensemble_of

    model = ensemble_of(members)
    val, _ = score(model, data.x["val"], data.y["val"])
    test, _ = score(model, data.x["test"], data.y["test"]) if with_test else ({}, None)
    return {"label_fraction": 1.0, "init": init, "seed": seeds, "n_labelled": n_labelled,
            "test_auc": test.get("auc"), "test_acc": test.get("accuracy"), "val_auc": val["auc"],
            "val_loss": val["loss"], "val_acc": val["accuracy"], "seconds": 0.0,
            "load_1min": round(os.getloadavg()[0], 2), "settings": digest}


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _line(record: dict[str, Any]) -> str:
    return (f"{record['init']:>17} {100 * record['label_fraction']:5.0f} % seed {record['seed']}: "
            f"n {record['n_labelled']}, val AUC {_fmt(record['val_auc'])} loss {_fmt(record['val_loss'])} "
            f"ACC {_fmt(record['val_acc'])} (kept epoch {record.get('kept_epoch')}), test AUC "
            f"{_fmt(record['test_auc'])} ACC {_fmt(record['test_acc'])}, {record['seconds']:.0f} s "
            f"(load {record['load_1min']})")


def run_scarcity(data: Data, *, fractions: list[float], seeds: list[int], inits: list[str], train, augment,
                 pretrain, with_test: bool, digest: dict[str, str], records: list[dict[str, Any]],
                 encoder_cache: Path | None,
                 save: Callable[[list[dict[str, Any]], list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Every (init, seed, fraction) run not yet in ``records`` with the same settings digest, then
    the ensembles at 100 %; ``save`` is called after every run with the current records and those
    of other settings (kept, not counted). Returns the current records."""
    def current(record: dict[str, Any]) -> bool:
        return record.get("settings") == digest.get(record["init"].removesuffix("_ensemble"))

    other = [r for r in records if not current(r)]  # kept in the file, never counted
    records = [r for r in records if current(r)]
    save(records, other)
    for init in inits:
        done = {(r["seed"], r["label_fraction"]) for r in records if r["init"] == init}
        # The ensemble needs its members in memory: without its record, the 100 % runs are redone.
        ensemble_due = len(seeds) > 1 and 1.0 in fractions and not any(
            r["init"] == f"{init}_ensemble" and r["seed"] == seeds for r in records)
        members = []
        for seed in seeds:
            todo = [f for f in fractions if (seed, f) not in done or (f == 1.0 and ensemble_due)]
            if not todo:
                continue
            params = (dataclasses.replace(train, seed=seed) if init == "pretrain"
                      else dataclasses.replace(train, seed=seed, **SCRATCH))
            initial, extra = None, {}
            if init == "pretrain":
                from dicomflow.model.transfer import LINEAGE_PREFIX, InitialWeights

                pretrain_seeded = dataclasses.replace(pretrain, seed=pretrain.seed + seed - train.seed)
                key = settings_digest({"pretrain": dataclasses.asdict(pretrain_seeded), "architecture":
                                       train.architecture, "augment": dataclasses.asdict(augment)},
                                      data.source, data.per_split)
                encoder, extra = pretrained_encoder(data, pretrain=pretrain_seeded, architecture=train.architecture,
                                                    augment=augment, cache=encoder_cache, key=key)
                initial = InitialWeights.from_model(encoder, {
                    LINEAGE_PREFIX: "pretrain", f"{LINEAGE_PREFIX}.pretrain_method": pretrain_seeded.method,
                    f"{LINEAGE_PREFIX}.pretrain_seed": str(pretrain_seeded.seed),
                    f"{LINEAGE_PREFIX}.pretrain_images": str(len(data.x["train"]))})
                extra["pretrain_seed"] = pretrain_seeded.seed
                print(f"pretrained encoder, seed {pretrain_seeded.seed}: {extra['pretrain_epochs']} epochs in "
                      f"{extra['pretrain_seconds']:.0f} s (load {extra['pretrain_load_1min']}), NT-Xent loss "
                      f"{extra['pretrain_first_loss']:.3f} -> {extra['pretrain_final_loss']:.3f}, positive top-1 "
                      f"{extra['pretrain_final_top1']:.3f}", file=sys.stderr)
            for fraction in todo:
                subset = stratified_subset(data.y["train"], fraction, seed=seed)
                model, history, seconds = fine_tune_one(data, subset, train=params, augment=augment, initial=initial)
                record, _ = run_record(fraction=fraction, init=init, seed=seed, subset=subset, model=model,
                                       history=history, seconds=seconds, data=data, with_test=with_test,
                                       digest=digest[init], **extra)
                records = [r for r in records if (r["init"], r["seed"], r["label_fraction"]) != (init, seed, fraction)]
                records.append(record)
                print(_line(record), file=sys.stderr)
                save(records, other)
                if fraction == 1.0:
                    members.append(model)
        if len(members) == len(seeds) > 1:
            record = ensemble_record(members, init=f"{init}_ensemble", seeds=seeds, data=data, with_test=with_test,
                                     digest=digest[init], n_labelled=len(data.y["train"]))
            records = [r for r in records if r["init"] != f"{init}_ensemble"]
            records.append(record)
            print(_line({**record, "kept_epoch": "-"}), file=sys.stderr)
            save(records, other)
    return records


# --- the command ----------------------------------------------------------------------------------


def add_scarcity_args(parser: argparse.ArgumentParser) -> None:
    """The ``--scarcity`` mode's options (``--npz``, ``--set`` and ``--json`` are shared)."""
    group = parser.add_argument_group("data-scarcity curve (--scarcity)")
    group.add_argument("--scarcity", action="store_true",
                       help="train in process on fractions of the training labels, scratch against pretrain")
    group.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS), metavar="F",
                       help="label fractions in (0, 1] (default: 0.1 0.25 0.5 1)")
    group.add_argument("--seeds", type=int, default=3, metavar="N",
                       help="seeds per point: train.seed, train.seed + 1, ... (default 3)")
    group.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS), help="arms to run")
    group.add_argument("--epochs", type=int, help="train.epochs for every run (shorthand for --set)")
    group.add_argument("--encoders", type=Path, metavar="DIR",
                       help="keep the pretrained encoders here and reuse those of the same settings")
    group.add_argument("--png", type=Path, metavar="FILE", help="draw the curve here")
    group.add_argument("--no-test", action="store_true",
                       help="leave the test split unread (choosing settings on validation)")
    group.add_argument("--quick", action="store_true",
                       help=f"a check of the path, not figures: {QUICK['per_split']} images per split, "
                            f"{QUICK['train.epochs']} epochs, {QUICK['pretrain.epochs']} of pretraining")


def scarcity_params(project: dict[str, Any], overrides: dict[str, dict[str, Any]], sets: dict[str, Any]):
    """TrainParams (``init`` pretrain), AugmentParams and PretrainParams (method simclr) from the
    project's params, the benchmark's overrides and ``--set``; one network per run (``train.ensemble`` 1)."""
    from bench.medmnist import apply_overrides
    from dicomflow.config.params import AugmentParams, PretrainParams, TrainParams, build_section

    merged, _ = apply_overrides(project, {**overrides, "pretrain": {"method": "simclr"}}, {})
    # Built as the pretrain arm's; the scratch arm drops the transfer keys (see scratch_params).
    merged, _ = apply_overrides(merged, {}, {"train.ensemble": 1, "train.init": "pretrain", **sets})
    return (build_section(TrainParams, "train", merged["train"]),
            build_section(AugmentParams, "augment", merged["augment"]),
            build_section(PretrainParams, "pretrain", merged["pretrain"]))


def print_scarcity_report(report, records: list[dict[str, Any]], *, fractions: list[float], inits: list[str],
                          paper_rows, with_test: bool) -> None:
    """The per-point table (val and test, mean (SD) over seeds), the paper's rows and the targets."""
    from bench.common import Column

    def cell(key: str, fraction: float, init: str) -> str:
        mean, sd, n = summarise(records, key, fraction, init)
        return "-" if not n else f"{mean:.3f} ({sd:.3f})" if n > 1 else f"{mean:.3f}"

    rows = []
    for fraction in fractions:
        for init in inits:
            n = [r["n_labelled"] for r in records if r["label_fraction"] == fraction and r["init"] == init]
            seconds = [r["seconds"] for r in records if r["label_fraction"] == fraction and r["init"] == init]
            if not n:
                continue
            rows.append({"point": f"{100 * fraction:g} % ({n[0]} labels)", "init": init, "runs": len(n),
                         "val_auc": cell("val_auc", fraction, init), "test_auc": cell("test_auc", fraction, init),
                         "test_acc": cell("test_acc", fraction, init), "seconds": float(np.mean(seconds))})
    for record in records:
        if record["init"].endswith("_ensemble"):
            rows.append({"point": "100 %", "init": f"{record['init']} ({len(record['seed'])} members)", "runs": 1,
                         "val_auc": _fmt(record["val_auc"]), "test_auc": _fmt(record["test_auc"]),
                         "test_acc": _fmt(record["test_acc"]), "seconds": None})
    rows += [{"point": "100 %", "init": f"MedMNIST v2 paper: {name}", "test_auc": f"{auc:.3f}",
              "test_acc": f"{acc:.3f}"} for name, auc, acc in paper_rows]
    report.table("scarcity", [Column("labels", "point"), Column("init", "init"), Column("runs", "runs"),
                              Column("val AUC mean (SD)", "val_auc"), Column("test AUC mean (SD)", "test_auc"),
                              Column("test ACC mean (SD)", "test_acc"), Column("s per run", "seconds", "{:.0f}")],
                 rows, title="## Data-scarcity curve: mean (SD) over seeds; test ACC at 0.5 (argmax)")
    if not with_test or not {"scratch", "pretrain"} <= set(inits):
        return
    for fraction in TARGET_LEAD_FRACTIONS:
        if fraction not in fractions:
            continue
        scratch, scratch_sd, _ = summarise(records, "test_auc", fraction, "scratch")
        pretrained, pretrained_sd, _ = summarise(records, "test_auc", fraction, "pretrain")
        sd = max(scratch_sd, pretrained_sd)
        report.target(f"pretrain beats scratch at {100 * fraction:g} % by > {TARGET_LEAD_SDS:g} x the seeds' SD "
                      f"(larger SD {sd:.3f})", pretrained - scratch > TARGET_LEAD_SDS * sd,
                      f"{pretrained - scratch:+.3f} AUC")
    ensemble = next((r for r in records if r["init"] == "pretrain_ensemble"), None)
    if ensemble is not None:
        report.target(f"pretrained ensemble test AUC >= {TARGET_ENSEMBLE_AUC}",
                      ensemble["test_auc"] >= TARGET_ENSEMBLE_AUC, f"{ensemble['test_auc']:.3f}")
        report.target(f"pretrained ensemble test ACC >= {TARGET_ENSEMBLE_ACC}",
                      ensemble["test_acc"] >= TARGET_ENSEMBLE_ACC, f"{ensemble['test_acc']:.3f}")
    report.print_targets(f"Targets (issue 35, {os.cpu_count()} CPUs)")


def main_scarcity(args: argparse.Namespace, *, project: dict[str, Any], overrides: dict[str, dict[str, Any]],
                  sets: dict[str, Any], paper_rows) -> None:
    """``bench.medmnist --scarcity``: read, run what is not recorded yet, print, draw, write."""
    import logging

    from bench.common import Report, code_version, cpu_line

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    bad = [f for f in args.fractions if not 0 < f <= 1]
    if bad:
        sys.exit(f"--fractions must lie in (0, 1]; got {bad[0]}")
    if args.seeds < 1:
        sys.exit(f"--seeds must be at least 1; got {args.seeds}")
    per_split = QUICK["per_split"] if args.quick else args.per_split
    sets = {**({"train.epochs": QUICK["train.epochs"], "pretrain.epochs": QUICK["pretrain.epochs"]}
               if args.quick else {}), **({"train.epochs": args.epochs} if args.epochs else {}), **sets}
    train, augment, pretrain = scarcity_params(project, overrides, sets)
    fractions = sorted(set(args.fractions))
    seeds = [train.seed + i for i in range(args.seeds)]
    # The transfer settings leave a scratch run unchanged: tuning them keeps the scratch records.
    scratch_settings = {"train": {k: v for k, v in dataclasses.asdict(train).items() if k not in SCRATCH},
                        "augment": dataclasses.asdict(augment)}
    digest = {"scratch": settings_digest(scratch_settings, args.npz, per_split),
              "pretrain": settings_digest({"train": dataclasses.asdict(train), "augment": dataclasses.asdict(augment),
                                           "pretrain": dataclasses.asdict(pretrain)},
                                          args.npz, per_split)}
    report = Report("medmnist-scarcity", args)
    earlier = []
    if args.json and args.json.is_file():
        figures = json.loads(args.json.read_text(encoding="utf-8")).get("figures", {})
        earlier = figures.get("records", []) + figures.get("records_other_settings", [])

    def save(records: list[dict[str, Any]], other: list[dict[str, Any]]) -> None:
        report.figures.update(records=records, records_other_settings=other, params={"train": dataclasses.asdict(train),
                                                       "augment": dataclasses.asdict(augment),
                                                       "pretrain": dataclasses.asdict(pretrain)})
        report.write(args.json)

    data = read_data(args.npz, per_split)
    print(f"code {code_version()}; {cpu_line()}; {args.npz.name}: "
          + ", ".join(f"{s} {len(y)} ({np.bincount(y).tolist()} per class)" for s, y in data.y.items())
          + f"; load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"train: {train}\naugment: {augment}\npretrain: {pretrain}", file=sys.stderr)
    records = run_scarcity(data, fractions=fractions, seeds=seeds, inits=list(args.inits), train=train,
                           augment=augment, pretrain=pretrain, with_test=not args.no_test, digest=digest,
                           records=earlier, save=save, encoder_cache=args.encoders)
    print("\nEvery run (validation figures drive every choice):")
    for record in records:
        print("  " + _line({"kept_epoch": "-", **record}))
    print_scarcity_report(report, records, fractions=fractions, inits=list(args.inits), paper_rows=paper_rows,
                          with_test=not args.no_test)
    if args.png and not args.no_test:
        draw_curve(records, args.png, fractions=fractions, paper=paper_rows[0][:2],
                   title=f"{args.npz.stem}: test AUC against labels ({len(seeds)} seeds)")
        print(f"\ncurve: {args.png}")
    report.write(args.json)
