"""Stage 3, fit: learn one node's hash trees and lookup tables (MADDNESS, Blalock & Guttag 2021).

Per codebook, a balanced binary regression tree of depth 4 hashes the row's subvector to one
of K = 16 leaves. Each level picks ONE split dimension for all its 2**level nodes (that is
what makes the hash vectorisable) and one threshold per node, greedily, to minimise the
within-bucket squared error of the subvectors. Tables are then fitted jointly for all
codebooks by ridge regression of the exact product on the one-hot codes, and quantised to
8 bits with a per-codebook offset and one shared scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse

from ..ops.spec import DEPTH, K, NODES, LutParams, apply_reference, encode_reference
from .partition import PARTITIONS, partition
from ..errors import OptionsError


TABLE_LOSSES = ("ridge", "mse", "kl")
SPN_ACTIVATIONS = ("float32", "uint8")


@dataclass(frozen=True)
class FitOptions:
    """How one node's trees and tables are fitted (its codebook count is the plan's, per node)."""

    partition: str = "opq"  # how input dimensions are split among codebooks (partition.PARTITIONS)
    # ridge tables only, or then optimised for the MSE after the activation; "kl" is MSE, but KL
    # between softmaxes on the node producing the logits
    table_loss: str = "kl"
    table_reg: float = 1.0  # lambda pulling optimised tables towards the ridge tables (relative)
    table_steps: int = 60  # L-BFGS iterations of the loss-aware table optimisation
    ridge: float = 1.0  # lambda of the ridge regression that fits the tables
    split_candidates: int = 16  # split dimensions tried per level, highest within-bucket SSE first
    # 0: thresholds searched at every distinct value (a sort per node and candidate); N >= 2:
    # between N equal-count quantile bins per dimension, in a few sparse products per level (the
    # same trees when a dimension has at most N distinct values). 256 fits MiniLM's 36 nodes in
    # 49 s instead of 117 s, but loses there through the 8-bit tables (README, split search)
    split_bins: int = 0
    # buckets homogeneous in the codebook's contribution to the output ("output"), or in its
    # input subvector as in MADDNESS ("input")
    tree_objective: str = "output"
    # 0: split dimensions anywhere in the input row. L >= 1: on a MatMul/Gemm whose input no
    # other replaced node produces (compile/prune.py lays out the others), the trees split only
    # on the columns of the L aligned 16-float lines (64-byte cache lines) of the row that carry
    # the most of the product's energy, so the encoder reads L lines of each row, not all of them
    split_lines: int = 0
    # the spn method's activations (ops/spn.py): "float32", or "uint8", each product's input rows
    # quantised to 8 bits on the fly so that the ternary products are integer dot products
    spn_activations: str = "float32"
    seed: int = 0

    def check(self) -> None:
        """A one-line ValueError for an unknown partition or table loss."""
        if self.table_loss not in TABLE_LOSSES:
            raise OptionsError(f"unknown table loss '{self.table_loss}', choose from {', '.join(TABLE_LOSSES)}")
        if self.partition not in PARTITIONS:
            raise OptionsError(f"unknown partition '{self.partition}', choose from {', '.join(PARTITIONS)}")
        if isinstance(self.split_bins, bool) or not isinstance(self.split_bins, (int, np.integer)) \
                or self.split_bins < 0 or self.split_bins == 1:
            raise OptionsError(f"split_bins must be 0 (exact search) or at least 2, got {self.split_bins}")
        if isinstance(self.split_lines, bool) or not isinstance(self.split_lines, (int, np.integer)) \
                or self.split_lines < 0:
            raise OptionsError(f"split_lines must be 0 (anywhere) or a number of lines >= 1, got {self.split_lines}")
        if self.spn_activations not in SPN_ACTIVATIONS:
            raise OptionsError(f"unknown spn activations '{self.spn_activations}', choose from "
                               f"{', '.join(SPN_ACTIVATIONS)}")


@dataclass
class NodeFit:
    params: LutParams
    groups: list[np.ndarray]  # the input dimensions of each codebook
    relative_error: float  # ||Y_lut - Y|| / ||Y|| on the fitting rows, after the activation


def _best_split(values: np.ndarray, rows: np.ndarray) -> tuple[float, np.float32]:
    """(SSE after the best split of `rows` [n, s] on `values` [n], threshold); x > t goes right."""
    n = len(values)
    if n == 0:
        return 0.0, np.float32(0.0)
    order = np.argsort(values, kind="stable")
    v = values[order]
    X = rows[order].astype(np.float64)
    X -= X.mean(axis=0)  # centring keeps the cumulative sums well conditioned
    total_sse = float(np.sum(X * X))
    if n < 2 or v[0] == v[-1]:
        return total_sse, np.float32(v[-1])
    cs = np.cumsum(X, axis=0)[:-1]  # sums of the first k rows, k = 1..n-1
    cs2 = np.cumsum(np.sum(X * X, axis=1))[:-1]
    k = np.arange(1, n, dtype=np.float64)
    tot = cs[-1] + X[-1]
    left = cs2 - np.sum(cs * cs, axis=1) / k
    right = (total_sse - cs2) - np.sum((tot - cs) ** 2, axis=1) / (n - k)
    loss = left + right
    loss[v[:-1] == v[1:]] = np.inf  # a threshold cannot separate equal values
    best = int(np.argmin(loss))
    lo, hi = v[best], v[best + 1]
    t = np.float32((np.float64(lo) + np.float64(hi)) / 2)
    if not lo <= t < hi:
        t = np.float32(lo)
    return float(loss[best]), t


def bin_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Sorted upper edges of at most `bins` bins of `values`: every distinct value but the largest
    when there are at most `bins` of them (bins then hold one value each, and the search is
    exact), else values at equal-count quantiles. Bin b holds edges[b-1] < x <= edges[b]."""
    distinct = np.unique(values)
    if len(distinct) <= bins:
        return distinct[:-1]
    ranked = np.sort(values)
    picks = np.unique(ranked[(np.arange(1, bins) * len(ranked)) // bins - 1])
    return picks[picks < distinct[-1]]


def _per_node_sums(node: np.ndarray, n_nodes: int, values: np.ndarray) -> np.ndarray:
    """[n_nodes, q] sums of the rows of `values` [n, q] in each node."""
    n = len(node)
    indicator = scipy.sparse.csr_matrix((np.ones(n), (node, np.arange(n))), shape=(n_nodes, n))
    return indicator @ values


def _histogram_level(sub: np.ndarray, target: np.ndarray, node: np.ndarray, n_nodes: int,
                     ranked: np.ndarray, binned: list[np.ndarray], n_bins: list[int]):
    """(loss, column, thresholds [n_nodes]) of the best split of one tree level, searched between
    the bins of the candidate columns `ranked` of `sub`, for all candidates and nodes at once.

    One sparse product gathers each (candidate, node, bin)'s row count, target sum and squared
    norm; cumulative sums over the bins then give every boundary's SSE, as a sort per node does
    over every distinct value. The chosen threshold is the midpoint between the node's own
    values either side of the boundary, as in the exact search.
    """
    n = len(node)
    counts = np.bincount(node, minlength=n_nodes)
    centred = target - (_per_node_sums(node, n_nodes, target) / np.maximum(counts, 1)[:, None])[node]
    features = np.column_stack([centred, np.sum(centred * centred, axis=1), np.ones(n)])
    width = max(n_bins[j] for j in ranked)
    keys = np.concatenate([(c * n_nodes + node) * width + binned[j] for c, j in enumerate(ranked)])
    gather = scipy.sparse.csr_matrix((np.ones(len(keys)), (keys, np.tile(np.arange(n), len(ranked)))),
                                     shape=(len(ranked) * n_nodes * width, n))
    cumulative = np.cumsum((gather @ features).reshape(len(ranked), n_nodes, width, -1), axis=2)
    total, left = cumulative[:, :, -1:], cumulative[:, :, :-1]
    right = total - left

    def sse(part):  # within-part squared error from its sums: sum ||t||^2 - ||sum t||^2 / count
        return part[..., -2] - np.sum(part[..., :-2] ** 2, axis=-1) / np.maximum(part[..., -1], 1)

    unsplit = sse(total)[..., 0]  # [candidates, nodes]
    loss = np.where((left[..., -1] > 0) & (right[..., -1] > 0), sse(left) + sse(right), np.inf)
    boundary = np.argmin(loss, axis=2) if width > 1 else np.zeros(unsplit.shape, dtype=np.int64)
    best = np.take_along_axis(loss, boundary[..., None], 2)[..., 0] if width > 1 else unsplit + np.inf
    splits = np.isfinite(best)
    per_candidate = np.where(splits, best, unsplit).sum(axis=1)
    c = int(np.argmin(per_candidate))
    column = ranked[c]
    values = sub[:, column]
    goes_left = binned[column] <= boundary[c][node]
    lo = np.full(n_nodes, -np.inf, dtype=np.float32)
    hi = np.full(n_nodes, np.inf, dtype=np.float32)
    top = np.full(n_nodes, -np.inf, dtype=np.float32)  # a node that cannot split sends all left
    np.maximum.at(lo, node[goes_left], values[goes_left])
    np.minimum.at(hi, node[~goes_left], values[~goes_left])
    np.maximum.at(top, node, values)
    top[counts == 0] = 0
    mid = lo.copy()  # between the node's own values either side, as the exact search sets it
    halfway = ((lo[splits[c]].astype(np.float64) + hi[splits[c]]) / 2).astype(np.float32)
    mid[splits[c]] = np.where((lo[splits[c]] <= halfway) & (halfway < hi[splits[c]]), halfway, lo[splits[c]])
    return float(per_candidate[c]), column, np.where(splits[c], mid, top).astype(np.float32)


def learn_tree(X: np.ndarray, dims: np.ndarray, candidates: int = 4,
               target: np.ndarray | None = None,
               dim_weights: np.ndarray | None = None,
               bins: int = FitOptions.split_bins) -> tuple[np.ndarray, np.ndarray]:
    """(split_dims [4] absolute, thresholds [15] heap-ordered) of one codebook's tree.

    Buckets are made homogeneous in `target` [N, q]: by default the subvector X[:, dims]
    itself (MADDNESS); the fitter may pass the codebook's contribution to the output instead.
    Candidate split dimensions are ranked by within-bucket SSE times `dim_weights`. Thresholds
    are searched between `bins` quantile bins of each dimension (the histogram search of
    gradient-boosting libraries: a few sparse products per level, where the exact search sorts
    every node for every candidate, 3,840 sorts per 16-codebook node), or at every distinct
    value when `bins` is 0.
    """
    sub = X[:, dims]
    target = sub if target is None else target
    if bins:
        target = np.asarray(target, dtype=np.float64)
        edges = [bin_edges(sub[:, j], bins) for j in range(len(dims))]
        binned = [np.searchsorted(e, sub[:, j], side="left") for j, e in enumerate(edges)]
        n_bins = [len(e) + 1 for e in edges]
    node = np.zeros(len(X), dtype=np.int64)
    split_dims = np.zeros(DEPTH, dtype=np.int32)
    thresholds = np.zeros(NODES, dtype=np.float32)
    for level in range(DEPTH):
        n_nodes = 1 << level
        members = [np.flatnonzero(node == i) for i in range(n_nodes)]
        # rank dimensions by their squared error within the current buckets
        sse = sum(((sub[m] - sub[m].mean(axis=0)) ** 2).sum(axis=0) for m in members if len(m))
        if dim_weights is not None:
            sse = sse * dim_weights
        ranked = np.argsort(-np.asarray(sse), kind="stable")[:candidates]
        if bins:
            _, j, node_thresholds = _histogram_level(sub, target, node, n_nodes, ranked, binned, n_bins)
        else:
            best = None
            for j in ranked:
                splits = [_best_split(sub[m, j], target[m]) for m in members]
                loss = sum(s[0] for s in splits)
                if best is None or loss < best[0]:
                    best = (loss, j, [s[1] for s in splits])
            _, j, node_thresholds = best
        split_dims[level] = dims[j]
        thresholds[n_nodes - 1:2 * n_nodes - 1] = node_thresholds
        node = 2 * node + (sub[:, j] > thresholds[n_nodes - 1 + node])
    return split_dims, thresholds


def _learn_codebook_tree(X: np.ndarray, dims: np.ndarray, weight: np.ndarray, options: FitOptions):
    if options.tree_objective == "input":
        return learn_tree(X, dims, options.split_candidates, bins=options.split_bins)
    if options.tree_objective != "output":
        raise OptionsError(f"unknown tree objective '{options.tree_objective}'")
    # the codebook's own contribution to the product, X[:, dims] @ w [N, M], is what its 16
    # table rows must reproduce. Its rank is at most len(dims), and with w = U S V^T,
    # ||X[:, dims] @ w||^2 = ||X[:, dims] @ U S||^2 for every bucket, so the trees see the same
    # squared errors in len(dims) columns instead of M: the split search is M / len(dims)
    # times cheaper, with the same splits up to float rounding.
    w = weight[dims].astype(np.float64)
    U, singular, _ = np.linalg.svd(w, full_matrices=False)
    contribution = X[:, dims].astype(np.float64) @ (U * singular)
    return learn_tree(X, dims, options.split_candidates, contribution, np.sum(w * w, axis=1),
                      options.split_bins)


@dataclass(frozen=True)
class TreeSource:
    """What re-learning a lookup node's trees needs beside its rows: each codebook's input
    dimensions (the partition the fitter chose) and the exact layer's weight [D, M], whose
    per-codebook contribution the trees make homogeneous (FitOptions.tree_objective)."""

    groups: list[np.ndarray]
    weight: np.ndarray
    options: FitOptions


def refit_trees(X: np.ndarray, current: np.ndarray, source: TreeSource) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(split_dims [C, 4], thresholds [C, 15], float tables [C, 16, M]): trees learned afresh on
    rows X [N, D] (the activations of the network as trained so far), split dimensions
    included, and tables ridge-fitted on their codes to `current` [N, M], the node's present
    output before its activation and bias, so that the network around it sees as little
    change as 16 leaves per codebook allow."""
    trees = [_learn_codebook_tree(X, g, source.weight, source.options) for g in source.groups]
    split_dims = np.stack([t[0] for t in trees])
    thresholds = np.stack([t[1] for t in trees])
    codes = encode_reference(X, split_dims, thresholds)
    return split_dims, thresholds, ridge_tables(codes, current, source.options.ridge)


def one_hot(codes: np.ndarray) -> np.ndarray:
    """float64 [N, C*16] indicator of each row's code in each codebook."""
    N, C = codes.shape
    G = np.zeros((N, C * K))
    G[np.arange(N)[:, None], np.arange(C) * K + codes] = 1.0
    return G


def ridge_tables(codes: np.ndarray, target: np.ndarray, ridge: float,
                 prior: np.ndarray | None = None) -> np.ndarray:
    """float64 [C, 16, M] tables minimising ||G T - target||^2 + ridge ||T - prior||^2 (prior 0)."""
    G = one_hot(codes)
    gram = G.T @ G
    gram[np.diag_indices_from(gram)] += ridge
    rhs = G.T @ target
    if prior is not None:
        rhs += ridge * prior.reshape(rhs.shape)
    T = scipy.linalg.solve(gram, rhs, assume_a="pos")
    return T.reshape(codes.shape[1], K, -1)


def quantise_tables(T: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """(uint8 [M, C, 16], scale, offsets [C]) with T ~= scale * q + offsets[c]."""
    offsets = T.min(axis=(1, 2))
    span = float((T.max(axis=(1, 2)) - offsets).max())
    scale = np.float32(span / 255.0) if span > 0 else np.float32(1.0)
    q = np.clip(np.rint((T - offsets[:, None, None]) / np.float64(scale)), 0, 255).astype(np.uint8)
    return q.transpose(2, 0, 1), float(scale), offsets.astype(np.float32)


def activate(y: np.ndarray, activation: str | None) -> np.ndarray:
    if activation is None:
        return y
    if activation == "Relu":
        return np.maximum(y, 0)
    raise ValueError(f"unsupported activation {activation}")


def relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    denom = float(np.linalg.norm(exact))
    return float(np.linalg.norm(approx - exact)) / (denom if denom > 0 else 1.0)


LINE_FLOATS = 16  # float32 columns per 64-byte cache line


def line_columns(X: np.ndarray, weight: np.ndarray, lines: int) -> np.ndarray:
    """The columns of the `lines` aligned LINE_FLOATS-column lines of X [N, D] whose columns j
    carry the most of X @ weight's energy, var(x_j) * ||weight[j]||^2 (all columns when fewer)."""
    D = X.shape[1]
    energy = X.astype(np.float64).var(axis=0) * np.sum(weight.astype(np.float64) ** 2, axis=1)
    line_of = np.arange(D) // LINE_FLOATS
    per_line = np.bincount(line_of, weights=energy, minlength=line_of[-1] + 1)
    kept = np.argsort(-per_line, kind="stable")[:lines]
    return np.flatnonzero(np.isin(line_of, kept))


def codebook_groups(X: np.ndarray, weight: np.ndarray, codebooks: int, options: FitOptions) -> list[np.ndarray]:
    """Each codebook's input dimensions: a partition of all D, or with options.split_lines of
    the columns of those lines only."""
    if not options.split_lines:
        return partition(X, codebooks, options.partition, options.seed)
    columns = line_columns(X, weight, options.split_lines)
    if len(columns) < codebooks:
        raise OptionsError(f"split_lines = {options.split_lines} keeps {len(columns)} input columns, fewer than the "
                           f"{codebooks} codebooks; allow more lines or use fewer codebooks")
    return [columns[g] for g in partition(X[:, columns], codebooks, options.partition, options.seed)]


def fit_node(X: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, activation: str | None,
             codebooks: int, options: FitOptions = FitOptions(),
             target: np.ndarray | None = None) -> NodeFit:
    """Fit the lookup replacement of `activation(X @ weight + bias)` on the rows of X [N, D],
    at `codebooks` codebooks (at most D).

    `target` [N, M], when given, is the pre-activation output to reproduce instead of
    X @ weight + bias: the original network's, when X comes from a network whose earlier
    layers are already lookups, so each node also corrects the errors of those before it.
    """
    X = np.asarray(X, dtype=np.float32)
    D, M = weight.shape
    if X.ndim != 2 or X.shape[1] != D:
        raise ValueError(f"activations of shape {X.shape} do not match a weight of shape {weight.shape}")
    groups = codebook_groups(X, weight, codebooks, options)
    trees = [_learn_codebook_tree(X, g, weight, options) for g in groups]
    split_dims = np.stack([t[0] for t in trees])
    thresholds = np.stack([t[1] for t in trees])
    codes = encode_reference(X, split_dims, thresholds)
    b = np.zeros(M, dtype=np.float32) if bias is None else bias.astype(np.float32)
    product = X.astype(np.float64) @ weight.astype(np.float64) if target is None else \
        np.asarray(target, dtype=np.float64) - b
    T = ridge_tables(codes, product, options.ridge)
    if options.table_loss != "ridge":
        T = optimise_tables(codes, T, product + b, b, activation, options)
    tables, scale, offsets = quantise_tables(T)
    params = LutParams(D=D, split_dims=split_dims, thresholds=thresholds, tables=tables,
                       scale=scale, offsets=offsets, bias=b, relu=activation == "Relu")
    exact = activate(product + b, activation)
    return NodeFit(params, groups, relative_error(apply_reference(X, params), exact))


def optimise_tables(codes: np.ndarray, T0: np.ndarray, exact: np.ndarray, bias: np.ndarray,
                    activation: str | None, options: FitOptions) -> np.ndarray:
    """Tables minimising loss(act(exact), act(G T + b)) + reg * ||T - T0||^2 (ITLUMM).

    The loss is taken after the node's activation: relative MSE, or for the logits layer the
    KL divergence between the softmaxes of the exact and the approximate outputs. Both terms
    are normalised by the target's scale, so `table_reg` is unit-free. L-BFGS minimises it,
    except for MSE without an activation, which is solved exactly (a ridge towards T0).
    """
    options.check()
    C, _, M = T0.shape
    if activation is None and options.table_loss == "mse":
        # the loss is quadratic in T: its exact minimiser is a ridge towards T0, one linear
        # solve instead of L-BFGS steps over every row (90 s at 15,593 rows x 384 outputs)
        norm_t = float(np.mean(T0 ** 2)) or 1.0
        norm_y = float(np.mean(exact ** 2)) or 1.0
        pull = options.table_reg * len(codes) * norm_y / (C * K * norm_t)
        return ridge_tables(codes, exact - bias, pull, prior=T0)
    import torch
    import torch.nn.functional as F

    idx = torch.from_numpy(codes.astype(np.int64) + np.arange(C) * K)
    T0_t = torch.from_numpy(T0.reshape(C * K, M))
    b = torch.from_numpy(bias.astype(np.float64))
    target = torch.from_numpy(activate(exact, activation))
    act = (lambda y: torch.relu(y)) if activation == "Relu" else (lambda y: y)
    if options.table_loss == "kl":
        target = F.log_softmax(target, dim=1)
    norm_t = float(torch.mean(T0_t ** 2)) or 1.0
    norm_y = float(torch.mean(target ** 2)) or 1.0
    T = T0_t.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([T], lr=1, max_iter=options.table_steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        y = act(F.embedding_bag(idx, T, mode="sum") + b)
        if options.table_loss == "kl":
            loss = F.kl_div(F.log_softmax(y, dim=1), target, log_target=True, reduction="batchmean")
        else:
            loss = torch.mean((y - target) ** 2) / norm_y
        loss = loss + options.table_reg * torch.mean((T - T0_t) ** 2) / norm_t
        loss.backward()
        return loss

    opt.step(closure)
    return T.detach().numpy().reshape(C, K, M)
