"""Is an accuracy distinguishable from chance? A permutation null without retraining.

The predictions stay as they are; the true labels are permuted among the evaluated patches (scipy's
``permutation_test``, pairings), which keeps every city's share and the predictions' own distribution
and breaks only their link. The p-value is one-sided (permuted accuracy at least the observed one),
with scipy's +1 correction, so it is never 0 and its floor is 1 / (permutations + 1).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import permutation_test

ALPHA = 0.05
CHANCE = "not distinguishable from chance"


def _accuracy(pred, labels, axis=-1):
    return (np.asarray(pred) == np.asarray(labels)).mean(axis=axis)


def accuracy_p_value(labels, pred, permutations: int = 1000, seed: int = 0) -> dict:
    """``{"p_value", "chance", "finding"}`` of the accuracy of ``pred`` against ``labels`` permuted;
    ``chance`` is true when p > ``ALPHA``, and ``finding`` then says it in words."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    res = permutation_test((pred, labels), _accuracy, permutation_type="pairings", vectorized=True,
                           n_resamples=permutations, alternative="greater", random_state=np.random.default_rng(seed))
    p = float(res.pvalue)
    return {"p_value": p, "chance": bool(p > ALPHA), "finding": CHANCE if p > ALPHA else f"above chance (p <= {ALPHA})"}
