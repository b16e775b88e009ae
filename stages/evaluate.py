"""Stage 7, evaluate: honest test-split metrics, DVC plots, and the model registered in MLflow.

Inputs: ``paths.model_dir`` (model and MLflow run), the split manifest and de-identified images.
Outputs: ``paths.eval_metrics`` (flat JSON, DVC metrics) and ``paths.eval_plots`` (ROC and
confusion-matrix data for ``dvc plots show``, plus PNG renderings logged to MLflow).
Params: ``evaluate.*``.

The operating threshold is chosen on the validation split, never on test, so the test figures are
what a user of the model would see. Before the model is registered, the leak scanner searches the
MLflow run (params, tags, metric names, artifacts, the model's files) for every identifying value
of the ingested sources (``paths.ingest_dir`` and ``paths.data``, read for this check only); any
hit fails the stage and nothing is registered. The model is registered under
``evaluate.registered_model_name``; it takes the alias ``champion`` when it beats the current
champion on ``evaluate.promotion_metric`` and ``challenger`` otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from stages import layout, tracking
from stages.cli import StageError, run_stage
from stages.deid_leaks import identifiers_at_ingest, scan_mlflow_run
from stages.params import load_params, read_params_file

logger = logging.getLogger(__name__)


def choose_threshold(y_true: np.ndarray, y_score: np.ndarray, *, method: str, fixed: float) -> float:
    """Operating threshold: Youden's J (max sensitivity + specificity - 1) or a fixed value."""
    if method == "fixed":
        return fixed
    if method != "youden":
        raise ValueError(f"method must be 'youden' or 'fixed'; got {method!r}")
    if len(np.unique(y_true)) < 2:
        raise StageError("the validation split holds one class only; cannot choose a threshold")
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def bootstrap_auc_interval(y_true: np.ndarray, y_score: np.ndarray, *, n_resamples: int = 1000,
                           seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the ROC AUC (resamples missing a class skipped)."""
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(y_true), len(y_true))
        if len(np.unique(y_true[idx])) == 2:
            aucs.append(roc_auc_score(y_true[idx], y_score[idx]))
    tail = (1 - level) / 2 * 100
    return float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))


def compute_metrics(y_true: np.ndarray, y_score: np.ndarray, *, threshold: float) -> dict[str, float]:
    """ROC AUC with its 95 % CI, and accuracy, sensitivity, specificity at ``threshold``."""
    if len(np.unique(y_true)) < 2:
        raise StageError("the test split holds one class only; ROC AUC is undefined")
    y_pred = (y_score >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    low, high = bootstrap_auc_interval(y_true, y_score)
    return {
        "roc_auc": float(roc_auc_score(y_true, y_score)),
        "roc_auc_ci_low": low,
        "roc_auc_ci_high": high,
        "accuracy": float((tp + tn) / len(y_true)),
        "sensitivity": float(tp / (tp + fn)),
        "specificity": float(tn / (tn + fp)),
        "threshold": float(threshold),
        "n_test": int(len(y_true)),
        "n_test_positive": int(y_true.sum()),
    }


def write_plot_data(y_true: np.ndarray, y_score: np.ndarray, *, threshold: float, out_dir: Path) -> list[Path]:
    """ROC points and per-image (actual, predicted) rows as CSV for ``dvc plots``, and PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thresholds, 1.0)}).to_csv(
        out_dir / "roc.csv", index=False)
    y_pred = (y_score >= threshold).astype(int)
    pd.DataFrame({"actual": y_true, "predicted": y_pred}).to_csv(out_dir / "confusion.csv", index=False)

    fig, (roc_ax, cm_ax) = plt.subplots(1, 2, figsize=(9, 4))
    roc_ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y_true, y_score):.3f}")
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test split")
    roc_ax.legend(loc="lower right")
    matrix = confusion_matrix(y_true, y_pred, labels=[0, 1])
    cm_ax.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        cm_ax.text(col, row, str(count), ha="center", va="center")
    cm_ax.set(xticks=[0, 1], yticks=[0, 1], xlabel="predicted", ylabel="actual",
              title=f"confusion at threshold {threshold:.2f}")
    fig.tight_layout()
    fig.savefig(out_dir / "roc_confusion.png", dpi=100)
    plt.close(fig)
    return [out_dir / "roc.csv", out_dir / "confusion.csv", out_dir / "roc_confusion.png"]


def should_promote(candidate: float, champion: float | None) -> bool:
    """A candidate becomes champion when there is none or it scores strictly higher."""
    return champion is None or candidate > champion


def register_model(model_uri: str, *, name: str, metric: str, value: float) -> tuple[str, str]:
    """Register ``model_uri`` and give it the alias champion or challenger; returns (version, alias).

    The test metric is stored as a tag on the model version, so a later candidate is compared
    with the champion's own figure whatever run it came from.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    metric_tag = f"test_{metric}"
    try:
        current = client.get_model_version_by_alias(name, "champion")
        champion_value = float(current.tags[metric_tag]) if metric_tag in current.tags else None
    except MlflowException:  # no registered model or no champion yet
        champion_value = None
    version = mlflow.register_model(model_uri, name).version
    client.set_model_version_tag(name, version, metric_tag, str(value))
    alias = "champion" if should_promote(value, champion_value) else "challenger"
    client.set_registered_model_alias(name, alias, version)
    logger.info("registered %s version %s as %s (%s %.4f vs champion %s)",
                name, version, alias, metric, value, champion_value)
    return str(version), alias


def check_run(run_id: str, *, ingest_dir: Path, data_dir: Path) -> None:
    """Leak scan of the MLflow run and its children; StageError (one line, no value) on any hit."""
    identifiers = identifiers_at_ingest(ingest_dir, data_dir)
    leaks = scan_mlflow_run(identifiers, run_id)
    if leaks:
        first = leaks[0]
        raise StageError(f"leak check: {len(leaks)} identifying value(s) in MLflow, first a "
                         f"{first.source} value in {first.output} at {first.location}; "
                         "the model is not registered")
    logger.info("leak check: none of %s identifying values found in MLflow run %s",
                f"{len(identifiers):,}", run_id)


def main() -> None:
    import keras
    import mlflow

    from stages.train import to_model_input

    paths, params = load_params("paths"), load_params("evaluate")
    model_dir = Path(paths.model_dir)
    model = keras.models.load_model(model_dir / layout.MODEL_FILE)
    run_info = json.loads((model_dir / layout.RUN_INFO).read_text())
    manifest = pd.read_parquet(Path(paths.split_dir) / layout.SPLIT_MANIFEST)
    images = np.load(Path(paths.deid_dir) / layout.IMAGES)

    def scores(split: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = (manifest["split"] == split).to_numpy()
        predicted = model.predict(to_model_input(images[chosen]), verbose=0).ravel()
        return manifest.loc[chosen, "label"].to_numpy().astype(int), predicted

    val_y, val_score = scores("val")
    test_y, test_score = scores("test")
    threshold = choose_threshold(val_y, val_score, method=params.threshold_method,
                                 fixed=params.fixed_threshold)
    metrics = compute_metrics(test_y, test_score, threshold=threshold)
    Path(paths.eval_metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(paths.eval_metrics).write_text(json.dumps(metrics, indent=2) + "\n")
    plot_files = write_plot_data(test_y, test_score, threshold=threshold, out_dir=Path(paths.eval_plots))
    logger.info("test ROC AUC %.3f (95%% CI %.3f-%.3f), sensitivity %.3f, specificity %.3f at %.3f",
                metrics["roc_auc"], metrics["roc_auc_ci_low"], metrics["roc_auc_ci_high"],
                metrics["sensitivity"], metrics["specificity"], threshold)

    # Evaluation is a nested run of the training run: evaluate.* can change and rerun this
    # stage alone, and MLflow forbids changing a param already logged on a run.
    tracking.configure_mlflow(experiment=None)
    test_metrics = {f"test_{name}": value for name, value in metrics.items()}
    with mlflow.start_run(run_id=run_info["run_id"]):
        mlflow.log_metrics(test_metrics)
        with mlflow.start_run(run_name="evaluate", nested=True, tags=tracking.run_tags()):
            mlflow.log_params(tracking.flatten_params({"evaluate": read_params_file()["evaluate"]}))
            mlflow.log_metrics(test_metrics)
            for path in [*plot_files, Path(paths.eval_metrics)]:
                mlflow.log_artifact(str(path), artifact_path="evaluation")
            check_run(run_info["run_id"], ingest_dir=Path(paths.ingest_dir), data_dir=Path(paths.data))
            version, alias = register_model(
                run_info["model_uri"], name=params.registered_model_name,
                metric=params.promotion_metric, value=metrics[params.promotion_metric],
            )
            mlflow.set_tags({"registered_version": version, "registered_alias": alias})

if __name__ == "__main__":
    run_stage(main)
