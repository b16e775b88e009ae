"""The evaluate stage's plots: ROC, confusion matrix, precision-recall and calibration, as CSV
data for ``dvc plots show`` and as PNG renderings (offline, ``dvc plots show`` lacks its Vega
scripts). Pure functions of labels, scores and the operating threshold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)


def calibration_table(y_true: np.ndarray, y_score: np.ndarray, *, n_bins: int = 10) -> pd.DataFrame:
    """Reliability-diagram data in ``n_bins`` equal-count bins of the images ranked by score.

    Parameters
    ----------
    y_true, y_score : ndarray of shape (n,)
        Labels (0 or 1) and predicted probabilities of class 1, in [0, 1].
    n_bins : int, default=10
        Number of bins; fewer only when there are fewer images than bins (one image each).

    Returns
    -------
    DataFrame
        One row per bin, ordered by score: ``mean_predicted`` (mean probability),
        ``fraction_positive`` and ``count`` (images in the bin; the counts sum to n and differ
        by at most one).

    Notes
    -----
    Quantile bins hold about n / n_bins images each, so every point rests on a similar number
    of images. A sigmoid's scores pile up near 0 and 1, and uniform bins on a test split of a
    hundred-odd images would leave the middle bins with a handful each, their fractions mostly
    noise. The bins are cut by rank, not at percentile edges: a confident model gives many
    images the same score (a saturated sigmoid is exactly 0.0 or 1.0 in float32), percentile
    edges then coincide and the edges of scikit-learn's ``calibration_curve`` leave most bins
    empty (3 of 10 on the sample's test split). Tied images are ranked in their input order, so
    two neighbouring bins may share a mean score; each is still an honest fraction of its own
    images. Bin edges move between runs: compare runs by the points, not by bin.
    """
    y_true = np.asarray(y_true, float).ravel()
    y_score = np.asarray(y_score, float).ravel()
    if len(y_true) != len(y_score) or not len(y_true):
        raise ValueError(f"y_true and y_score must be non-empty and of the same length; got {len(y_true)} "
                         f"and {len(y_score)}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive int; got {n_bins!r}")
    bins = [rows for rows in np.array_split(np.argsort(y_score, kind="stable"), n_bins) if len(rows)]
    return pd.DataFrame({"mean_predicted": [y_score[rows].mean() for rows in bins],
                         "fraction_positive": [y_true[rows].mean() for rows in bins],
                         "count": [len(rows) for rows in bins]})


def write_plot_data(y_true: np.ndarray, y_score: np.ndarray, *, threshold: float, out_dir: Path) -> list[Path]:
    """Plot data as CSV for ``dvc plots`` and two PNG renderings; returns every file written.

    ``roc.csv`` (fpr, tpr, threshold), ``confusion.csv`` (actual, predicted per image),
    ``pr.csv`` (recall, precision; recall falls from 1 to 0), ``calibration.csv`` (see
    :func:`calibration_table`), ``roc_confusion.png`` and ``pr_calibration.png``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thresholds, 1.0)}).to_csv(
        out_dir / "roc.csv", index=False)
    y_pred = (y_score >= threshold).astype(int)
    pd.DataFrame({"actual": y_true, "predicted": y_pred}).to_csv(out_dir / "confusion.csv", index=False)
    precision, recall, _ = precision_recall_curve(y_true, y_score)
    pr = pd.DataFrame({"recall": recall, "precision": precision})
    pr.to_csv(out_dir / "pr.csv", index=False)
    calibration = calibration_table(y_true, y_score)
    calibration.to_csv(out_dir / "calibration.csv", index=False)

    plt = pyplot()
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
    save_figure(fig, out_dir / "roc_confusion.png")
    _draw_pr_calibration(y_true, y_score, y_pred, pr=pr, calibration=calibration,
                         path=out_dir / "pr_calibration.png")
    return [out_dir / name for name in ("roc.csv", "confusion.csv", "pr.csv", "calibration.csv",
                                        "roc_confusion.png", "pr_calibration.png")]


def confusion_table(y_true: np.ndarray, called: np.ndarray, *, classes: list[int]) -> pd.DataFrame:
    """The confusion matrix, counts and row-normalised, one row per (actual, called) pair.

    Parameters
    ----------
    y_true, called : ndarray of shape (n,)
        True and called class indices, 0 to k - 1.
    classes : list of int
        The label of each class index.

    Returns
    -------
    DataFrame
        k * k rows, actual-major: ``actual`` and ``called`` (labels), ``count`` and ``row_share``
        (the count over the images of that actual class: each actual class's shares sum to 1;
        NaN for a class with no image).
    """
    k = len(classes)
    counts = np.zeros((k, k), int)
    np.add.at(counts, (np.asarray(y_true, int), np.asarray(called, int)), 1)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.full((k, k), np.nan), where=totals > 0)
    return pd.DataFrame([{"actual": classes[a], "called": classes[c], "count": int(counts[a, c]),
                          "row_share": float(shares[a, c])} for a in range(k) for c in range(k)])


def write_confusion_matrix(y_true: np.ndarray, called: np.ndarray, *, classes: list[int], out_dir: Path,
                           caption: str = "") -> list[Path]:
    """The confusion matrix of any number of classes as ``confusion_matrix.csv``
    (:func:`confusion_table`) and ``confusion_matrix.png``: counts on the left, row-normalised
    (each actual class's share called each class: its sensitivity on the diagonal) on the right.

    ``caption`` says how images were called (e.g. "most probable class", "median grade",
    "threshold 0.42"); it goes in the titles. Returns both paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    table = confusion_table(y_true, called, classes=classes)
    table.to_csv(out_dir / "confusion_matrix.csv", index=False, float_format="%.6g")
    k = len(classes)
    counts = table["count"].to_numpy().reshape(k, k)
    shares = table["row_share"].to_numpy().reshape(k, k)
    size = 3.2 + 0.45 * k
    fig, axes = pyplot().subplots(1, 2, figsize=(2 * size + 1.0, size), layout="constrained")
    panels = ((axes[0], counts, max(int(counts.max()), 1), "counts", "{:.0f}"),
              (axes[1], shares, 1.0, "row-normalised", "{:.2f}"))
    for ax, values, top, title, number in panels:
        ax.imshow(values, cmap="Blues", vmin=0, vmax=top)
        for (row, col), value in np.ndenumerate(values):
            dark = value / top > 0.6  # white text on dark cells
            ax.text(col, row, "" if np.isnan(value) else number.format(value), ha="center", va="center",
                    fontsize=8 if k > 6 else 9, color="white" if dark else "black")
        ax.set(xticks=range(k), yticks=range(k), xticklabels=[str(c) for c in classes],
               yticklabels=[str(c) for c in classes], xlabel="called", ylabel="actual",
               title=f"{title}{f' ({caption})' if caption else ''}")
        ax.title.set_fontsize(9)
    fig.suptitle(f"confusion matrix, test split ({len(y_true)} images)", fontsize=10)
    save_figure(fig, out_dir / "confusion_matrix.png")
    return [out_dir / "confusion_matrix.csv", out_dir / "confusion_matrix.png"]


def write_class_reliability(y_true: np.ndarray, probabilities: np.ndarray, *, classes: list[int], out_dir: Path,
                            n_bins: int = 10) -> list[Path]:
    """Per-class reliability of k > 2 classes, one-vs-rest: each class's probability against the
    share of images of that class, in ``n_bins`` equal-width bins
    (:func:`dicomflow.metrics.reliability_table`, the bins of its ECE).

    Writes ``reliability_per_class.csv`` (a ``class`` column, then the bins) and
    ``reliability_per_class.png`` (one panel per class, each point labelled with its images);
    returns both paths.
    """
    from dicomflow.metrics import Scores, ece, reliability_table

    y_true, probabilities = np.asarray(y_true, int).ravel(), np.asarray(probabilities, float)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {label: pd.DataFrame(reliability_table((y_true == k).astype(int), probabilities[:, k], n_bins=n_bins))
              for k, label in enumerate(classes)}
    pd.concat([table.assign(**{"class": label}) for label, table in tables.items()])[
        ["class", "low", "high", "count", "mean_predicted", "observed"]].to_csv(
        out_dir / "reliability_per_class.csv", index=False, float_format="%.6g")
    columns = min(len(classes), 4)
    rows = -(-len(classes) // columns)
    fig, axes = pyplot().subplots(rows, columns, figsize=(3.0 * columns, 3.1 * rows), squeeze=False,
                                  layout="constrained")
    for k, (ax, (label, table)) in enumerate(zip(axes.ravel(), tables.items())):
        filled = table[table["count"] > 0]
        gap = ece(Scores.at_threshold((y_true == k).astype(int), probabilities[:, k]))
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
        ax.plot(filled["mean_predicted"], filled["observed"], marker="o")
        _label_counts(ax, filled["mean_predicted"], filled["observed"], filled["count"])
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=f"class {label}: ECE {gap:.3f}")
        ax.title.set_fontsize(9)
    for ax in axes.ravel()[len(classes):]:
        ax.set_visible(False)
    fig.supxlabel("predicted probability of the class", fontsize=9)
    fig.supylabel("share of images of the class", fontsize=9)
    fig.suptitle(f"per-class reliability, test split ({len(y_true)} images, {n_bins} equal bins; "
                 "numbers: images per bin)", fontsize=9)
    save_figure(fig, out_dir / "reliability_per_class.png")
    return [out_dir / "reliability_per_class.csv", out_dir / "reliability_per_class.png"]


def write_confusion_data(y_true: np.ndarray, y_pred: np.ndarray, *, out_dir: Path) -> list[Path]:
    """``confusion.csv`` (actual, predicted class index per image) for more than two classes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"actual": y_true, "predicted": y_pred}).to_csv(out_dir / "confusion.csv", index=False)
    return [out_dir / "confusion.csv"]


def _draw_pr_calibration(y_true: np.ndarray, y_score: np.ndarray, y_pred: np.ndarray, *,
                         pr: pd.DataFrame, calibration: pd.DataFrame, path: Path) -> None:
    """Precision-recall curve with the operating point, and the reliability diagram, as one PNG."""
    fig, (pr_ax, cal_ax) = pyplot().subplots(1, 2, figsize=(9, 4))
    pr_ax.plot(pr["recall"], pr["precision"], drawstyle="steps-post",
               label=f"AP {average_precision_score(y_true, y_score):.3f}")
    pr_ax.axhline(y_true.mean(), linestyle="--", color="grey", label="prevalence")
    pr_ax.plot(recall_score(y_true, y_pred), precision_score(y_true, y_pred, zero_division=0.0),
               "o", color="black", label="operating point")
    pr_ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", ylim=(0, 1.02),
              title="precision-recall, test split")
    pr_ax.legend(loc="lower left")
    cal_ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    cal_ax.plot(calibration["mean_predicted"], calibration["fraction_positive"], marker="o",
                label=f"Brier {brier_score_loss(y_true, y_score):.3f}")
    _label_counts(cal_ax, calibration["mean_predicted"], calibration["fraction_positive"], calibration["count"])
    cal_ax.set(xlabel="mean predicted probability", ylabel="fraction positive", xlim=(-0.02, 1.02),
               ylim=(-0.02, 1.02), title=f"calibration, {len(calibration)} equal-count bins")
    cal_ax.title.set_fontsize(10)
    # Below the axes: inside, any corner can hold points (a poorly calibrated model's sit top left).
    cal_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False,
                  title="numbers: images per bin", title_fontsize=8, fontsize=8)
    save_figure(fig, path)


def _label_counts(ax, xs, ys, counts, *, color: str | None = None, below: bool = False) -> None:
    """Write each point's image count beside it; points within about 1 % of the axes of each
    other (tied or near-tied bins) get one label with their total, so labels never overprint."""
    totals: dict[tuple[float, float], list[int]] = {}
    for x, y, count in zip(xs, ys, counts):
        totals.setdefault((round(float(x), 2), round(float(y), 2)), []).append(int(count))
    for (x, y), shared in totals.items():
        text = str(sum(shared)) if len(shared) == 1 else f"{sum(shared)} ({len(shared)} bins)"
        right_edge = x > 0.85  # written to the left of the point, inside the axes
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(-4 if right_edge else 4, -10 if below else 5),
                    ha="right" if right_edge else "left", fontsize=7, color=color)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on CI or the device machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as PNG and free it (laid out tightly unless it has a layout of its own)."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def write_reliability_diagram(y_true: np.ndarray, calibrated: np.ndarray, uncalibrated: np.ndarray, *,
                              out_dir: Path, n_bins: int = 10) -> list[Path]:
    """The reliability diagram of the test split in ``n_bins`` equal-width bins, with and without
    the model's calibration: ``reliability.csv`` (one row per bin and version, with its image
    count) and ``reliability.png`` (each point labelled with its count, a histogram of counts
    below). Equal-width bins, unlike :func:`calibration_table`, put both versions on the same
    bins: the ones ECE is computed on (:func:`dicomflow.metrics.reliability_table`).
    """
    from dicomflow.metrics import Scores, brier, ece, reliability_table

    out_dir.mkdir(parents=True, exist_ok=True)
    versions = {"calibrated": calibrated, "uncalibrated": uncalibrated}
    table = pd.DataFrame([{"version": name, **row} for name, scores in versions.items()
                          for row in reliability_table(y_true, scores, n_bins=n_bins)])
    table.to_csv(out_dir / "reliability.csv", index=False, float_format="%.6g")

    fig, (curve_ax, count_ax) = pyplot().subplots(2, 1, figsize=(5.5, 7.5), height_ratios=(3, 1.3), sharex=True)
    curve_ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    width = 1.0 / n_bins
    for offset, (name, scores) in zip((-0.2, 0.2), versions.items()):
        rows = table[(table["version"] == name) & (table["count"] > 0)]
        line, = curve_ax.plot(rows["mean_predicted"], rows["observed"], marker="o",
                              label=f"{name}: ECE {ece(Scores.at_threshold(y_true, scores)):.3f}, "
                                    f"Brier {brier(Scores.at_threshold(y_true, scores)):.3f}")
        _label_counts(curve_ax, rows["mean_predicted"], rows["observed"], rows["count"],
                      color=line.get_color(), below=name == "uncalibrated")
        every = table[table["version"] == name]
        count_ax.bar(every["low"] + width * (0.5 + offset), every["count"], width=width * 0.4,
                     color=line.get_color(), label=name)
    binary = np.asarray(calibrated).ndim == 1
    curve_ax.set(ylabel="fraction positive" if binary else "top-label accuracy", xlim=(-0.02, 1.02),
                 ylim=(-0.02, 1.02))
    fig.suptitle(f"reliability, test split ({len(y_true)} images, {n_bins} equal bins;\n"
                 "numbers: images per bin)", fontsize=9)
    # Above the axes, not in a corner: which corners are free depends on the model.
    curve_ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.01), fontsize=8, frameon=False)
    count_ax.set(xlabel="predicted probability" if binary else "top-label confidence", ylabel="images")
    count_ax.set_yscale("symlog")
    save_figure(fig, out_dir / "reliability.png")
    return [out_dir / "reliability.csv", out_dir / "reliability.png"]
