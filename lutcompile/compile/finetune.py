"""Stage 5, fine-tune: train what is still trainable around the lookup nodes (torch).

Two uses, both through `TorchProgram` (the ONNX graph run in torch):
- ITLUMM's incremental pass: after layer l is replaced, the exact layers after it are trained
  on the calibration data, so they adapt to the lookups' errors before they are replaced;
- beyond the paper, `train_tables`: with every code fixed by its input, the output is linear
  in the table entries, so the tables (through a straight-through 8-bit rounding), the lookup
  biases and any exact layers left are trained end to end.
The objective is cross-entropy with labels, or without labels distillation (KL) from the
original model's outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from .calibrate import CalibrationData
from .torch_program import TorchProgram


@dataclass(frozen=True)
class FinetuneOptions:
    """The fine-tune stage: ITLUMM's incremental pass and the end-to-end table training."""

    # the incremental pass: replace nodes one by one, training the later exact layers after
    # each (None: on when the calibration data has labels)
    enabled: bool | None = None
    tables: bool = False  # afterwards, train the tables, lookup biases and exact layers end to end
    # in that stage, train the trees' thresholds too, with gradients into each lookup's input
    # (hard forward, soft-tree straight-through backward: torch_program.LutModule)
    trees: bool = False
    tree_temperature: float = 0.1  # the soft tree's tau, relative to each codebook's threshold spread
    # the train stage (compile_model(train=...), --train): every lookup's tables and trees and
    # every exact layer, end to end on the training rows, against the original model's logits
    train_epochs: int = 10
    train_lr: float = 3e-3
    distill_weight: float = 0.5  # with labels: (1 - w) cross-entropy + w distillation
    distill_temperature: float = 4.0
    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 64
    table_epochs: int = 10
    table_lr: float = 1e-2
    tables_in_pass: bool = False  # also train the replaced nodes' tables at every step of the pass
    val_fraction: float = 0.05  # rows held out to pick the best epoch
    seed: int = 0


def train(model: onnx.ModelProto, data: CalibrationData, teacher_logits: np.ndarray | None,
          trainable: set[str], options: FinetuneOptions, train_tables: bool = False,
          epochs: int | None = None, lr: float | None = None, progress=None,
          train_trees: bool = False) -> onnx.ModelProto:
    """Train `trainable` initializers (and the tables, if asked) of `model`; a trained copy.

    The objective: cross-entropy on the labels; distillation (KL) from `teacher_logits` when
    there are no labels; both, weighted by options.distill_weight, when there are both.

    A seeded `val_fraction` of the rows is held out; the parameters of the epoch with the
    lowest held-out loss are kept (epoch 0 being the untrained model), so training cannot
    make the model worse on data it was not trained on.
    """
    program = TorchProgram(model, trainable, train_tables, train_trees, options.tree_temperature)
    params = [p for p in program.parameters() if p.requires_grad]
    if not params:
        return model
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    epochs = epochs or (options.table_epochs if train_tables else options.epochs)
    lr = lr or (options.table_lr if train_tables else options.lr)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    inputs = [torch.from_numpy(data.inputs[name]) for name in program.input_names]
    labels = None if data.labels is None else torch.from_numpy(data.labels)
    teacher = None if teacher_logits is None else torch.from_numpy(teacher_logits.astype(np.float32))

    # a model whose inputs fix the batch (say [1, 1, 28, 28]) runs only whole batches of that size
    fixed = _fixed_batch(model, program.input_names)
    step = fixed or options.batch_size

    def loss_on(rows: torch.Tensor) -> torch.Tensor:
        if fixed and len(rows) != fixed:  # in whole batches, the rows past the last one left out
            chunks = [rows[i:i + fixed] for i in range(0, len(rows) - fixed + 1, fixed)]
            return torch.stack([loss_on(c) for c in chunks]).mean()
        logits = program(*(x[rows] for x in inputs))[0].reshape(len(rows), -1)
        if teacher is None:
            return F.cross_entropy(logits, labels[rows])
        T = options.distill_temperature if labels is not None else 1.0
        distill = F.kl_div(F.log_softmax(logits / T, dim=1), F.log_softmax(teacher[rows] / T, dim=1),
                           log_target=True, reduction="batchmean") * T * T
        if labels is None:
            return distill
        w = options.distill_weight
        return (1 - w) * F.cross_entropy(logits, labels[rows]) + w * distill

    shuffled = torch.from_numpy(rng.permutation(data.rows))
    n_val = int(data.rows * options.val_fraction) if data.rows >= 100 else 0
    n_val = n_val - n_val % fixed if fixed else n_val
    val, fit_rows = shuffled[:n_val], shuffled[n_val:]

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(loss_on(val)) if n_val else 0.0

    best = (held_out_loss(), [p.detach().clone() for p in params])
    steps = range(epochs)
    for _ in (progress(steps) if progress else steps):
        order = fit_rows[torch.from_numpy(rng.permutation(len(fit_rows)))]
        for start in range(0, len(order) - (fixed or 1) + 1, step):
            loss = loss_on(order[start:start + step])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        current = held_out_loss()
        if not n_val or current < best[0]:
            best = (current, [p.detach().clone() for p in params])
    with torch.no_grad():
        for p, kept in zip(params, best[1]):
            p.copy_(kept)
    trained = onnx.ModelProto()
    trained.CopyFrom(model)
    program.write_back(trained)
    return trained


def _fixed_batch(model: onnx.ModelProto, input_names: list[str]) -> int | None:
    """The batch size the model's inputs fix (their first dimension), or None if it is free."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    fixed = {d[0].dim_value for name in input_names if (d := dims.get(name)) and d[0].HasField("dim_value")}
    return fixed.pop() if len(fixed) == 1 and 0 not in fixed else None
