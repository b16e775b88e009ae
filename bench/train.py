"""Benchmark: the train stage's training throughput against the seed's plain ``model.fit``.

Times, side by side in one run on the same images, the same network and the same image size:
- ``seed model.fit``: the seed's recipe, the network built by ``stages.train`` (``seed_cnn`` or
  ``resnet_small``), ``model.compile(optimizer="adam", loss="binary_crossentropy",
  metrics=["accuracy"])`` with Keras' defaults otherwise, then ``model.fit(x, y, batch_size=32,
  epochs=..., verbose=0)`` on float32 NumPy arrays held in memory; no augmentation, no validation;
- ``train stage``: ``dicomflow.model.training.train_model`` as the stage calls it: the ``train`` section of
  ``params.yaml`` (its batch size, learning rate, schedule, class weights, seed, strategy) with only
  the architecture set to the network under test, early stopping off and as many epochs as timed,
  ``augment`` from ``params.yaml`` (on-the-fly augmentation on), no checkpoint, no resume folder.
  Every epoch of the stage also predicts the validation split and scores both splits; that time
  counts against the stage, but images/s counts training images only;
- ``bare train step``: the bound no input pipeline can beat: the stage's train step (network,
  Adam, batch size from ``params.yaml``) on one batch held as a constant, as many steps per epoch
  as the stage takes, nothing else (no input, no augmentation, no validation).

Each side runs in a fresh subprocess per repetition (no warm caches shared), baseline and stage
alternating (A B A B ...), so load from other processes hits both alike. In each, a first epoch
(graph tracing, thread pools, first allocations) is run and not timed; the clock runs from the end
of that epoch to the end of the last, ``--epochs`` epochs later. Images/s = training images x timed
epochs / those seconds; the table gives the median over ``--repeat`` repetitions with min-max, the
stage's median over the baseline's, the same for images per CPU-second (the rate over the CPU cores
the worker kept busy: what it did with the CPU it got, which other processes' load disturbs far less
than the wall-clock rate), and the peak RSS of the worker process (Python, TensorFlow and the data
included; sampled from outside by ``bench.common.run_measured``). The baseline imports TensorFlow
before anything of this project, as the seed did, so it runs on the kernels TensorFlow picks by
itself. Data: synthetic images (noise, a faint square on class 1) at ``ingest.image_size`` x
``ingest.channels``, or with ``--data`` the project's de-identified images and split
(``paths.deid_dir``/images.npy, ``paths.split_dir``/manifest.parquet: train and val). Targets (issue
14; 2 CPU cores): for ``resnet_small`` the stage, augmentation and the batch-normalisation
statistics pass included, >= 0.9x the bare step's images/s, and the statistics pass <= 10 % of the
timed epochs' wall time (measured inside the stage's worker). The earlier target against
``model.fit`` was withdrawn: ``model.fit`` runs at the bare step's speed or at about half of it,
from one process to the next.

    .venv/bin/python -m bench.train [--networks seed_cnn resnet_small resnet3d_small] [--epochs 2]
        [--repeat 3] [--train-images 512] [--val-images 64] [--batch-size N] [--data] [--json FILE]

``resnet3d_small`` (not in the default list) trains on synthetic volumes of
``ingest.series.volume_size`` x 1 channel (with ``train.batch_size`` 32 a step takes seconds on 2
cores: use ``--batch-size 8`` and a few dozen ``--train-images``; ``bench.series`` runs it so).

With the defaults, about 10 minutes on 2 cores (``--networks seed_cnn`` alone: about 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import (
    ROOT,
    Column,
    Report,
    add_output_args,
    bench_env,
    run_measured,
    work_folder,
)

TARGET_OF_BOUND = 0.9  # the train stage's images/s over the bare train step's
TARGET_STATISTICS_SHARE = 0.10  # of an epoch's wall time
SEED_BATCH_SIZE = 32
SIDES = {"baseline": "seed model.fit", "stage": "train stage", "bound": "bare train step"}


def synthetic_images(n: int, *, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 noise images or volumes (n, *shape) in [0, 1], ``shape`` = (side, side, channels)
    or (depth, height, width, channels); class 1 carries a faint square (a cube in a volume)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.normal(0.4, 0.08, (n, *shape)).astype(np.float32)
    spatial = shape[:-1]
    for image, label in zip(images, labels):
        if label:
            corner = [rng.integers(0, side - max(2, side // 8)) for side in spatial]
            image[tuple(slice(c, c + max(2, side // 8)) for c, side in zip(corner, spatial))] += 0.25
    return np.clip(images, 0.0, 1.0), labels


def input_shape(network: str) -> tuple[int, ...]:
    """The shape of one input of ``network`` under the project's params: ``ingest.series.volume_size``
    x 1 channel for the volume networks, else ``ingest.image_size`` squared x ``ingest.channels``."""
    from dicomflow.config.params import load_params
    from dicomflow.model.architectures import VOLUME_ARCHITECTURES

    ingest = load_params("ingest")
    if network in VOLUME_ARCHITECTURES:
        return (*ingest.series.volume_size, 1)
    return (ingest.image_size, ingest.image_size, ingest.channels)


def project_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The de-identified training and validation images with their class indices, as the stage loads them."""
    import pandas as pd

    from dicomflow.config.params import load_params
    from dicomflow.model.training import split_arrays

    paths, ingest = load_params("paths"), load_params("ingest")
    if len(ingest.classes) != 2:
        sys.exit(f"--data: ingest.classes has {len(ingest.classes)} classes, but the seed's recipe "
                 "(one sigmoid, binary_crossentropy) needs 2; run without --data for synthetic images")
    for required in (Path(paths.deid_dir) / "images.npy", Path(paths.split_dir) / "manifest.parquet"):
        if not required.is_file():
            sys.exit(f"--data: {required} not found; run the pipeline up to split (dvc repro split) "
                     "or leave out --data for synthetic images")
    manifest = pd.read_parquet(Path(paths.split_dir) / "manifest.parquet")
    images = np.load(Path(paths.deid_dir) / "images.npy", mmap_mode="r")
    return (*split_arrays(manifest, images, "train", ingest.classes),
            *split_arrays(manifest, images, "val", ingest.classes))


def clock() -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (every thread, user and system), now."""
    times = os.times()
    return time.perf_counter(), times.user + times.system


def run_baseline(data: dict, network: str, epochs: int, batch_size: int | None = None) -> dict:
    """The seed's recipe (its batch size whatever ``batch_size``); returns the clock at the end of
    every epoch (the first one is warm-up)."""
    # Keras (TensorFlow) before anything from stages: TensorFlow picks its kernels when it loads,
    # and the seed's process loaded it with nothing of this project's imported yet.
    import keras

    from dicomflow.model.architectures import ARCHITECTURES

    ends: list[tuple[float, float]] = []

    class EpochClock(keras.callbacks.Callback):
        # on_epoch_end only: per-batch hooks would make Keras wait for every step's logs.
        def on_epoch_end(self, epoch, logs=None):
            ends.append(clock())

    keras.utils.set_random_seed(0)
    x, y = data["train_x"], data["train_y"].astype(np.float32)
    model = ARCHITECTURES[network](x.shape[1:])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=SEED_BATCH_SIZE, epochs=epochs + 1, verbose=0, callbacks=[EpochClock()])
    return {"epoch_ends": ends, "batch_size": SEED_BATCH_SIZE}


def run_stage(data: dict, network: str, epochs: int, batch_size: int | None = None) -> dict:
    """``train_model`` as the stage calls it; returns the clock at the end of every epoch and the
    wall seconds each batch-normalisation statistics pass took (start, end)."""
    from dicomflow.config.params import load_params
    from dicomflow.model import training as train

    params = dataclasses.replace(load_params("train"), architecture=network, epochs=epochs + 1,
                                 early_stopping_patience=0)
    if batch_size:
        params = dataclasses.replace(params, batch_size=batch_size)
    ends: list[tuple[float, float]] = []
    passes: list[tuple[float, float]] = []
    refresh = train.BatchNormStatistics.__call__

    def timed_refresh(self, images):
        started = time.perf_counter()
        refresh(self, images)
        passes.append((started, time.perf_counter()))

    train.BatchNormStatistics.__call__ = timed_refresh
    train.train_model(data["train_x"], data["train_y"], data["val_x"], data["val_y"], params=params,
                      checkpoint=None, augment=load_params("augment"),
                      strategy=train.make_strategy(params.strategy),
                      on_epoch_end=lambda epoch, row: ends.append(clock()))
    # The passes inside the timed epochs (the warm-up epoch's and the final one after the loop out).
    timed = sum(end - begin for begin, end in passes if begin > ends[0][0] and end <= ends[-1][0])
    return {"epoch_ends": ends, "batch_size": params.batch_size, "statistics_seconds": timed}


def run_bound(data: dict, network: str, epochs: int, batch_size: int | None = None) -> dict:
    """What no input pipeline can beat: the stage's train step (network, Adam, batch size) run on
    one batch held as a constant, as many steps per epoch as the stage takes; nothing else."""
    import keras
    import tensorflow as tf

    from dicomflow.config.params import load_params
    from dicomflow.model.architectures import ARCHITECTURES

    keras.utils.set_random_seed(0)
    batch_size = batch_size or load_params("train").batch_size
    images = tf.constant(data["train_x"][:batch_size])
    labels = tf.constant(data["train_y"][:batch_size, None].astype(np.float32))
    model = ARCHITECTURES[network](images.shape[1:])
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.binary_crossentropy(labels, model(images, training=True)))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    ends: list[tuple[float, float]] = []
    steps = -(-len(data["train_x"]) // batch_size)
    for _ in range(epochs + 1):
        for _ in range(steps):
            loss = step()
        loss.numpy()  # the steps are asynchronous: wait for the last one
        ends.append(clock())
    return {"epoch_ends": ends, "batch_size": batch_size, "images_per_epoch": steps * batch_size}


def worker(side: str, network: str, epochs: int, data_file: Path, result_file: Path,
           batch_size: int | None = None) -> None:
    """One side, one repetition, in this (fresh) process: its figures to ``result_file`` (JSON)."""
    with np.load(data_file) as stored:
        data = {name: stored[name] for name in stored.files}
    result = {"baseline": run_baseline, "stage": run_stage, "bound": run_bound}[side](
        data, network, epochs, batch_size)
    ends = result.pop("epoch_ends")
    if len(ends) != epochs + 1:
        sys.exit(f"{side} ran {len(ends)} epochs, expected {epochs + 1}")
    seconds, cpu_seconds = ends[-1][0] - ends[0][0], ends[-1][1] - ends[0][1]
    images = result.pop("images_per_epoch", len(data["train_x"])) * epochs
    if "statistics_seconds" in result:
        result["statistics_share"] = result.pop("statistics_seconds") / seconds
    result_file.write_text(json.dumps({**result, "seconds": seconds, "images_per_s": images / seconds,
                                       "cores_busy": cpu_seconds / seconds}), encoding="utf-8")


def measure(side: str, network: str, epochs: int, data_file: Path, batch_size: int | None = None) -> dict:
    """Run one side in a fresh interpreter (``batch_size``: instead of ``train.batch_size``, for
    the stage and the bare step); return its figures with its peak RSS."""
    folder = data_file.parent
    result_file = folder / "result.json"
    command = [sys.executable, "-m", "bench.train", "--worker", side, "--network", network,
               "--epochs", str(epochs), "--data-file", str(data_file), "--result-file", str(result_file),
               *(["--batch-size", str(batch_size)] if batch_size else [])]
    run = run_measured(command, cwd=ROOT, log=folder / f"{side}.log",
                       env=bench_env(TF_CPP_MIN_LOG_LEVEL="2"))
    return {**json.loads(result_file.read_text(encoding="utf-8")), "peak_rss_mib": run.memory.rss}


def median_of(runs: list[dict], key: str) -> float:
    if key == "per_cpu_s":  # images per CPU-second: what the process did with the CPU it got
        return statistics.median(r["images_per_s"] / r["cores_busy"] for r in runs)
    return statistics.median(r[key] for r in runs)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["seed_cnn", "resnet_small"],
                        choices=["seed_cnn", "resnet_small", "resnet3d_small"],
                        help="resnet3d_small trains on synthetic volumes of ingest.series.volume_size")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up epoch")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each side, alternating")
    parser.add_argument("--train-images", type=int, default=512, help="synthetic training images")
    parser.add_argument("--val-images", type=int, default=64, help="synthetic validation images")
    parser.add_argument("--batch-size", type=int,
                        help="instead of train.batch_size for the stage and the bare step (the seed's is 32)")
    parser.add_argument("--data", action="store_true",
                        help="the project's de-identified train and val images instead of synthetic ones")
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--network", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    add_output_args(parser, folders=False)
    args = parser.parse_args()
    os.chdir(ROOT)  # params.yaml and the paths in it are relative to the project root, as DVC runs stages
    if args.worker:
        return worker(args.worker, args.network, args.epochs, args.data_file, args.result_file,
                      args.batch_size)
    if args.epochs < 1 or args.repeat < 1:
        parser.error(f"--epochs and --repeat must be >= 1; got {args.epochs} and {args.repeat}")

    from dicomflow.config.params import load_params

    if args.data and "resnet3d_small" in args.networks:
        parser.error("--data: the project's images are 2D; resnet3d_small trains on synthetic volumes")
    data: dict[str, dict[str, np.ndarray]] = {}  # by network
    for network in args.networks:
        if args.data:
            data[network] = dict(zip(("train_x", "train_y", "val_x", "val_y"), project_images()))
            source = "project data (outputs/deidentify/images.npy, split manifest)"
        else:
            shape = input_shape(network)
            train_x, train_y = synthetic_images(args.train_images, shape=shape, seed=0)
            val_x, val_y = synthetic_images(args.val_images, shape=shape, seed=1)
            data[network] = {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y}
            source = "synthetic"
        print(f"{network} data: {source}; train {data[network]['train_x'].shape}, "
              f"val {data[network]['val_x'].shape}, float32")
    train, augment = load_params("train"), load_params("augment")
    print(f"stage params: train.batch_size={args.batch_size or train.batch_size}, lr={train.lr}, "
          f"lr_schedule={train.lr_schedule}, "
          f"class_weight={train.class_weight}, strategy={train.strategy}; augmentation: "
          + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(augment).items()))
    print(f"timed: {args.epochs} epoch(s) after 1 warm-up epoch, {args.repeat} repetition(s) per side, "
          "each in a fresh process, alternating")
    print(f"CPUs: {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))}); "
          f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")

    report = Report("train", args)
    results: dict[tuple[str, str], list[dict]] = {}
    start = time.perf_counter()
    with work_folder("train") as folder:
        for network in args.networks:
            data_file = folder / network / "data.npz"
            data_file.parent.mkdir()
            np.savez(data_file, **data.pop(network))
            for _ in range(args.repeat):
                for side in SIDES:  # alternating, so that drift in the machine's load hits both
                    results.setdefault((network, side), []).append(
                        measure(side, network, args.epochs, data_file, args.batch_size))

    rows = []
    for network in args.networks:
        base = {name: median_of(results[(network, "baseline")], name) for name in ("images_per_s", "per_cpu_s")}
        for side, name in SIDES.items():
            runs = results[(network, side)]
            rate, per_cpu = median_of(runs, "images_per_s"), median_of(runs, "per_cpu_s")
            rows.append({"side": name, "network": network, "batch_size": runs[0]["batch_size"],
                         "images_per_s": rate, "images_per_s_spread": spread([r["images_per_s"] for r in runs]),
                         "speed_up": rate / base["images_per_s"], "images_per_cpu_s": per_cpu,
                         "speed_up_per_cpu_s": per_cpu / base["per_cpu_s"],
                         "cores_busy": median_of(runs, "cores_busy"),
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)})
    report.table("train", [
        Column("side", "side"), Column("network", "network"), Column("batch size", "batch_size"),
        Column("images/s median (min-max)", "images_per_s_spread"), Column("speed-up", "speed_up", "{:.2f}x"),
        Column("images per CPU-s", "images_per_cpu_s", "{:,.0f}"),
        Column("speed-up per CPU-s", "speed_up_per_cpu_s", "{:.2f}x"),
        Column("CPU cores busy", "cores_busy", "{:.2f}"), Column("peak RSS (MiB)", "peak_rss_mib", "{:,.0f}")],
        rows)
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"wall time {time.perf_counter() - start:.0f} s")
    print("The stage's time includes its per-epoch validation pass and scoring; images/s counts "
          "training images only. CPU cores busy = the worker's CPU seconds (all threads) over its wall "
          "seconds; below 2 means the process waited, for other processes' load or for its own work.")
    shares = {network: median_of(results[(network, "stage")], "statistics_share") for network in args.networks}
    report.figures["statistics_share"] = shares
    print("The batch-normalisation statistics pass (BatchNormStatistics, once per epoch) took a median "
          + ", ".join(f"{shares[n]:.1%} of {n}'s timed epochs" for n in args.networks)
          + " (seed_cnn has no batch normalisation).")
    speed = {(row["network"], row["side"]): row["speed_up"] for row in rows}
    for network in args.networks:
        if network == "resnet_small":  # issue 14's targets; seed_cnn has no statistics pass
            of_bound = speed[network, SIDES["stage"]] / speed[network, SIDES["bound"]]
            report.target(f"{network}: train stage >= {TARGET_OF_BOUND}x the bare step's images/s",
                          of_bound >= TARGET_OF_BOUND, of_bound)
            report.target(f"{network}: statistics pass <= {TARGET_STATISTICS_SHARE:.0%} of an epoch",
                          shares[network] <= TARGET_STATISTICS_SHARE, f"{shares[network]:.1%}")
    if report.targets:
        report.print_targets("Targets (issue 14, 2 cores)")
    report.write(args.json)


if __name__ == "__main__":
    main()
