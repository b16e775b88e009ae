"""Fixed (not learnt) aggregations of the probabilities of a study's parts into the study's.

A study's label belongs to the study, not to one of its slices or views: a CT series of 32 slices
or a radiograph study's PA and lateral views get one probability, combined from the slice model's
or the image model's per-part probabilities. Used by the study-level evaluation of 2-D studies
and by series scored slice by slice; the learnt alternative is attention-based MIL
(:func:`dicomflow.model.architectures.build_attention_mil`).
"""

from __future__ import annotations

import numpy as np

from dicomflow.config.params import AGGREGATIONS



def aggregate(probabilities: np.ndarray, method: str, *, k: int = 3) -> float:
    """One study's probability from its parts' probabilities of the positive class.

    Parameters
    ----------
    probabilities : ndarray of shape (n,)
        The parts' (slices', views') probabilities, each in [0, 1].
    method : str
        One of :data:`AGGREGATIONS`: ``mean``, ``max``, or ``topk_mean`` (the mean of the ``k``
        largest; of all of them when the study has ``k`` parts or fewer).
    k : int, default=3
        The parts ``topk_mean`` averages; unused by the other methods.

    Returns
    -------
    float
        The study's probability, in [0, 1].

    Raises
    ------
    ValueError
        ``method`` not in :data:`AGGREGATIONS`, ``k`` below 1, or ``probabilities`` empty, not
        one-dimensional, not finite or outside [0, 1].
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"aggregation method must be one of {', '.join(AGGREGATIONS)}; got {method!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the parts topk_mean averages) must be an int >= 1; got {k!r}")
    values = np.asarray(probabilities, dtype=np.float64)
    if values.ndim != 1 or not len(values):
        raise ValueError(f"probabilities must be a non-empty 1-D array (one per slice or view of one study); "
                         f"got shape {values.shape}")
    if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
        raise ValueError(f"probabilities must be finite and in [0, 1]; got values from {np.nanmin(values)!r} to "
                         f"{np.nanmax(values)!r} (NaN: {int(np.isnan(values).sum())}): pass the model's "
                         "probabilities, not its logits")
    if method == "mean":
        return float(values.mean())
    if method == "max":
        return float(values.max())
    return float(np.sort(values)[-min(k, len(values)):].mean())
