"""How the D input dimensions are split among the C codebooks.

- contiguous: dimensions in their stored order, cut into C chunks.
- r2 (ITLUMM): average-linkage hierarchical clustering of the dimensions on 1 - R^2, their
  squared correlation; the dendrogram's leaf order is cut into C chunks, so dimensions that
  predict each other share a codebook.
- opq: an OPQ rotation (Ge et al. 2013) learned by alternating product quantisation and
  orthogonal Procrustes, then projected to the nearest permutation by max-weight matching.

Zero-variance dimensions (MNIST's border pixels) carry no information: they are left out of
r2 and opq and dealt round-robin to the chunks, so no codebook is wasted on them.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.cluster.hierarchy
import scipy.cluster.vq
import scipy.linalg
import scipy.optimize
import scipy.spatial.distance
from ..errors import OptionsError

PARTITIONS = ("contiguous", "r2", "opq")


def partition(X: np.ndarray, C: int, method: str = "contiguous", seed: int = 0) -> list[np.ndarray]:
    """C disjoint groups of input dimensions covering all D; sizes differ by at most one."""
    D = X.shape[1]
    if not 1 <= C <= D:
        raise OptionsError(f"codebooks must be between 1 and the input width {D}, got {C}")
    if method == "contiguous":
        return _chunks(np.arange(D), C)
    if method not in PARTITIONS:
        raise OptionsError(f"unknown partition '{method}', choose from {', '.join(PARTITIONS)}")
    X = np.asarray(X, dtype=np.float64)
    varying = np.flatnonzero(X.std(axis=0) > 1e-12 * (1 + np.abs(X).max(axis=0)))
    constant = np.setdiff1d(np.arange(D), varying)
    if len(varying) < C:  # too few informative dimensions to order; keep the stored order
        return _chunks(np.arange(D), C)
    sub = X[:, varying]
    order = _r2_order(sub) if method == "r2" else _opq_order(sub, C, seed)
    # the informative dims are cut evenly; constant dims then go round-robin, smallest chunk first
    groups = [list(varying[g]) for g in _chunks(order, C)]
    for d in constant:
        min(groups, key=len).append(int(d))
    return [np.sort(np.asarray(g, dtype=np.int64)) for g in groups]


def _chunks(order: np.ndarray, C: int) -> list[np.ndarray]:
    return [np.asarray(g, dtype=np.int64) for g in np.array_split(np.asarray(order), C)]


def _r2_order(X: np.ndarray) -> np.ndarray:
    """Leaf order of the average-linkage dendrogram of the dimensions on 1 - R^2."""
    if X.shape[1] < 3:
        return np.arange(X.shape[1])
    r2 = np.corrcoef(X, rowvar=False) ** 2
    distance = np.clip(1.0 - r2, 0.0, 1.0)
    np.fill_diagonal(distance, 0.0)
    tree = scipy.cluster.hierarchy.linkage(scipy.spatial.distance.squareform(distance, checks=False),
                                           method="average")
    return scipy.cluster.hierarchy.leaves_list(tree)


def opq_rotation(X: np.ndarray, C: int, iterations: int = 8, seed: int = 0,
                 max_rows: int = 4096) -> np.ndarray:
    """Orthogonal R [D, D] such that product quantisation of X @ R (C codebooks, K=16) errs least.

    Learned on at most `max_rows` rows (seeded subsample): the rotation needs the data's
    second-order structure, not every row.
    """
    rng = np.random.default_rng(seed)
    if len(X) > max_rows:
        X = X[np.sort(rng.choice(len(X), max_rows, replace=False))]
    X = X - X.mean(axis=0)
    D = X.shape[1]
    R = np.eye(D)
    groups = _chunks(np.arange(D), C)
    for _ in range(iterations):
        Z = X @ R
        recon = np.empty_like(Z)
        for g in groups:
            sub = Z[:, g]
            k = min(16, len(np.unique(sub, axis=0)))
            with warnings.catch_warnings():  # an empty cluster just leaves a centroid unused
                warnings.simplefilter("ignore", UserWarning)
                centroids, labels = scipy.cluster.vq.kmeans2(sub, k, iter=10, minit="++",
                                                             seed=int(rng.integers(2**31)))
            recon[:, g] = centroids[labels]
        # orthogonal Procrustes: the rotation taking X closest to its quantised image
        if not np.all(np.isfinite(recon)):
            break
        R = _procrustes(X, recon)
    return R


def _procrustes(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The orthogonal R minimising ||A R - B||.

    LAPACK's gesvd always converges, but at D = 1536 it takes 28 s where the divide-and-conquer
    gesdd (scipy's orthogonal_procrustes) takes 1.3 s. Up to GESVD_MAX_D, where it costs at most
    a few seconds per node, gesvd stays, so that compiles of such models remain byte-identical
    to those the published tables were measured on; above, gesdd, with gesvd if it fails."""
    if A.shape[1] > GESVD_MAX_D:
        try:
            return scipy.linalg.orthogonal_procrustes(A, B)[0]
        except np.linalg.LinAlgError:
            pass
    U, _, Vt = scipy.linalg.svd(A.T @ B, lapack_driver="gesvd")
    return U @ Vt


GESVD_MAX_D = 1024


def _opq_order(X: np.ndarray, C: int, seed: int) -> np.ndarray:
    """Dimensions ordered by the OPQ rotation projected to the nearest permutation."""
    R = opq_rotation(X, C, seed=seed)
    # input dimension i goes to rotated position perm[i], maximising sum R[i, perm[i]]^2
    rows, cols = scipy.optimize.linear_sum_assignment(R ** 2, maximize=True)
    position = np.empty(X.shape[1], dtype=np.int64)
    position[rows] = cols
    return np.argsort(position, kind="stable")
