"""Seeded, stratified held-out splits: the training scripts' test and validation splits and the
budget search's held-out calibration rows are all drawn this way."""
from __future__ import annotations

import numpy as np


def stratified_split(y: np.ndarray, n_hold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, hold), both sorted; hold has n_hold rows in per-class proportion.

    Per class c with n_c rows, floor(n_hold * n_c / N) are held out; leftover
    rows go to the classes with the largest remainders.  Within a class the rows
    are chosen by one numpy permutation from ``default_rng(seed)``, classes in
    order 0..9.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    counts = np.array([(y == c).sum() for c in classes])
    exact = n_hold * counts / len(y)
    take = np.floor(exact).astype(int)
    rest = n_hold - take.sum()
    take[np.argsort(-(exact - take), kind="stable")[:rest]] += 1
    hold = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(y == c)
        hold.append(idx[rng.permutation(len(idx))[:k]])
    hold_idx = np.sort(np.concatenate(hold))
    mask = np.ones(len(y), dtype=bool)
    mask[hold_idx] = False
    return np.flatnonzero(mask), hold_idx
