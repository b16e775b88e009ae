"""The training curves as a PNG: what ``dvc plots show`` draws from the history, readable offline.

DVC renders its Vega plots in a browser that must fetch Vega from the internet; without one they
are silently left out. This picture needs nothing.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PANELS = (("loss", "Loss"), ("auc", "ROC AUC"), ("brier", "Brier score"))


def write_training_curves(history: pd.DataFrame, path: Path) -> None:
    """Loss, AUC and Brier score per epoch, on the training batches and on validation, one line
    per ensemble member; the kept epoch of each member is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for axis, (name, title) in zip(axes, PANELS):
        for member, rows in history.groupby("member"):
            suffix = f" (member {member})" if history["member"].nunique() > 1 else ""
            line, = axis.plot(rows["epoch"], rows[name], linestyle="--", label=f"training{suffix}")
            axis.plot(rows["epoch"], rows[f"val_{name}"], color=line.get_color(), label=f"validation{suffix}")
            kept = rows[rows["kept"].astype(bool)]
            axis.plot(kept["epoch"], kept[f"val_{name}"], "o", color=line.get_color(),
                      label=f"kept epoch{suffix}")
        axis.set(title=title, xlabel="epoch")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
