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

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from .augment import Augment
from .calibrate import CalibrationData
from .distributed import World, data_parallel
from .fit import TreeSource, refit_trees
from .torch_program import TorchProgram


@dataclass(frozen=True)
class TrainOptions:
    """The train stage's recipe (--train). Chosen by measurement on the shipped MNIST MLP at
    C = 64, held-out test accuracy (scripts/train_table.py; the notes of issue 14): Adam with a
    one-cycle schedule at lr 1e-3 (3e-3 diverged early; 3e-4 was slower), mixup 0.3 with the
    teacher run on the mixed rows (+0.8 points over none: without it the lookups, fitted on
    the same rows, have nothing left to learn), soft-tree temperature 0.3 (0.1 gave noisier
    threshold gradients), 90 % distillation (T = 4) and 10 % cross-entropy, and an exponential
    moving average of the parameters (decay 0.995 per step) as the kept model. With
    augmentation (an image model's `augment`), 40 epochs and no mixup: on the MLP at C = 64,
    mixup on top of augmentation lost 0.5 points, and augmented rows keep paying past 20
    epochs, since every epoch draws new ones (the notes of issue 14)."""

    epochs: int | None = None  # None: DEFAULT_EPOCHS, or AUGMENTED_EPOCHS with augment
    lr: float = 1e-3
    schedule: str = "onecycle"  # finetune.train's schedule
    mixup: float | None = None  # Beta(a, a) parameter (0: off; None: DEFAULT_MIXUP, or 0 with augment)
    tree_temperature: float = 0.3
    distill_weight: float = 0.9
    ema: float = 0.995
    batch_size: int = 64
    # halutmatmul's schedule: replace the nodes one by one, each fitted on the activations of
    # the model trained so far, training everything after each (the epochs shared between
    # the rounds); False: fit every node on the original model, then train once
    layerwise: bool = False
    # random image augmentation of the training rows (compile/augment.py; None: off)
    augment: Augment | None = None
    # learned split dimensions: every this many epochs the trees are learned afresh on the
    # activations of the network as trained so far (finetune.train's resplit; 0: the fitter's
    # split dimensions stay, only the thresholds train)
    resplit_every: int = 0
    # StrassenNets' third phase: after the train stage, this many epochs train only the SpnMatMul
    # nodes' a, their ternary weights frozen (0: none)
    scale_epochs: int = 0

    DEFAULT_EPOCHS = 20
    AUGMENTED_EPOCHS = 40
    DEFAULT_MIXUP = 0.3

    @property
    def epoch_count(self) -> int:
        return self.epochs or (self.AUGMENTED_EPOCHS if self.augment is not None else self.DEFAULT_EPOCHS)

    @property
    def mixup_alpha(self) -> float:
        return (0.0 if self.augment is not None else self.DEFAULT_MIXUP) if self.mixup is None else self.mixup


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
    train: "TrainOptions" = field(default_factory=lambda: TrainOptions())
    distill_weight: float = 0.5  # with labels: (1 - w) cross-entropy + w distillation
    distill_temperature: float = 4.0
    # what distillation matches: "kl" between softmaxes of a classifier's logits, "mse" the
    # outputs themselves (relative squared error: hidden states, embeddings); "auto": kl for a
    # [rows, classes] output, mse for any other shape
    objective: str = "auto"
    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 64
    table_epochs: int = 10
    table_lr: float = 1e-2
    tables_in_pass: bool = False  # also train the replaced nodes' tables at every step of the pass
    val_fraction: float = 0.05  # rows held out to pick the best epoch
    seed: int = 0


@dataclass(frozen=True)
class EpochRecord:
    """One point of a training curve: epoch 0 is the model before training."""

    epoch: int
    train_loss: float | None  # mean over the epoch's batches (None at epoch 0)
    held_out_loss: float | None  # on the held-out slice, never trained on (None without one)
    held_out_accuracy: float | None  # top-1 on that slice, when the rows have labels
    seconds: float  # since training began


@dataclass
class TrainingCurve:
    """What a training run did, epoch by epoch, and which epoch's parameters it kept."""

    stage: str
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    reference_loss: float | None = None  # the original (exact) model on the same held-out slice
    reference_accuracy: float | None = None


@dataclass
class Trained:
    model: onnx.ModelProto
    curve: TrainingCurve


Teacher = Union[np.ndarray, onnx.ModelProto, None]


def train(model: onnx.ModelProto, data: CalibrationData, teacher: Teacher, trainable: set[str],
          options: FinetuneOptions, train_tables: bool = False, epochs: int | None = None,
          lr: float | None = None, progress=None, train_trees: bool = False, mixup: float = 0.0,
          schedule: str = "cosine", stage: str = "fine-tune", held_out: np.ndarray | None = None,
          ema: float = 0.0, group: World = World(), augment: Augment | None = None,
          mask: str | None = None, resplit: dict[str, TreeSource] | None = None,
          resplit_every: int = 0, train_spn_scales: bool = False) -> Trained:
    """Train `trainable` initializers (and the tables and trees, if asked) of `model`.

    The objective: cross-entropy on the labels; distillation (KL) from the teacher when there
    are no labels; both, weighted by options.distill_weight, when there are both. The teacher
    is the original model's logits on the rows (an array), or the original model itself, run
    in torch on each batch as trained (needed with mixup, whose inputs are new points).

    mixup: each batch is mixed with a shuffled copy of itself, x = lam x + (1 - lam) x', lam ~
    Beta(mixup, mixup); the labels' cross-entropy is mixed the same way. schedule: "cosine"
    (cosine decay from lr, stepped per epoch) or "onecycle" (warm-up over the first 15 % of steps, then cosine).
    augment: each training batch's float inputs are first augmented (compile/augment.py), and
    the teacher runs on the augmented rows (it must then be the model, as with mixup).
    ema: when > 0, an exponential moving average of the parameters (this decay per step) is
    what each epoch evaluates and what is kept: the hard lookups' thresholds jitter between
    steps, and their average generalises better.
    group: under torchrun, the ranks train data-parallel (compile/distributed.py), each on its
    own shard of the training rows; all evaluate the same held-out rows.
    mask: the input whose zeros mark padding positions (calibrate.mask_input): with the mse
    objective, output positions it masks do not count.
    resplit, resplit_every: every `resplit_every` epochs (but after the last), the trees of the
    lookup nodes named in `resplit` are learned afresh, split dimensions included, on their
    inputs as the network now computes them (fit.refit_trees), and their tables refitted to
    their present outputs. It re-splits the parameters' average (with `ema`), from which the
    live parameters then restart; the optimiser's state restarts for the trees and tables.
    train_spn_scales: the SpnMatMul nodes' `a` train (with train_tables, everything of them does).

    The rows `held_out` (default: a seeded `val_fraction`) are never trained on; the parameters of the epoch with the
    lowest held-out loss are kept (epoch 0 being the untrained model), so training cannot
    make the model worse on data it was not trained on. The curve records every epoch.
    """
    if options.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {options.objective!r}, choose from {', '.join(OBJECTIVES)}")
    program = TorchProgram(model, trainable, train_tables, train_trees, options.tree_temperature, train_spn_scales)
    curve = TrainingCurve(stage)
    params = [p for p in program.parameters() if p.requires_grad]
    if not params:
        return Trained(model, curve)
    if (mixup > 0 or augment is not None) and isinstance(teacher, np.ndarray):
        raise ValueError("mixup and augmentation need the teacher model, not its logits on the original rows")
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    epochs = epochs or (options.table_epochs if train_tables else options.epochs)
    lr = lr or (options.table_lr if train_tables else options.lr)
    inputs = [_rows_tensor(data.inputs[name]) for name in program.input_names]
    inputs_by_name = dict(zip(program.input_names, inputs))
    labels = None if data.labels is None else torch.from_numpy(data.labels)
    teacher_logits = torch.from_numpy(teacher.astype(np.float32)) if isinstance(teacher, np.ndarray) else None
    # nothing in it trains: TorchProgram makes parameters only of what it is told to train
    teacher_program = TorchProgram(teacher).eval() if isinstance(teacher, onnx.ModelProto) else None

    # a model whose inputs fix the batch (say [1, 1, 28, 28]) runs only whole batches of that size
    fixed = _fixed_batch(model, program.input_names)
    step = fixed or options.batch_size

    def losses(rows: torch.Tensor, training: bool, net=program) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) on `rows`; when `training`, augmented and mixed as asked."""
        if fixed and len(rows) != fixed:  # in whole batches, the rows past the last one left out
            parts = [losses(rows[i:i + fixed], training, net) for i in range(0, len(rows) - fixed + 1, fixed)]
            return torch.stack([p[0] for p in parts]).mean(), torch.cat([p[1] for p in parts])
        xs = [x[rows] for x in inputs]
        if training and augment is not None:
            xs = [augment(x, generator) if x.is_floating_point() else x for x in xs]
        pair, lam = None, 1.0
        if training and mixup > 0:
            pair = torch.from_numpy(rng.permutation(len(rows)))
            lam = float(rng.beta(mixup, mixup))
            xs = [lam * x + (1 - lam) * x[pair] if x.is_floating_point() else x for x in xs]
        output = net(*xs)[0]
        logits = output.reshape(len(rows), -1)
        if teacher_logits is not None:
            target = teacher_logits[rows]
        elif teacher_program is not None:
            with torch.no_grad():
                target = teacher_program(*xs)[0]
        else:
            target = None
        if target is not None and _objective(options.objective, output) == "mse":
            return _relative_squared_error(output, target.reshape(output.shape),
                                           None if mask is None else inputs_by_name[mask][rows]), logits
        target = None if target is None else target.reshape(len(rows), -1)

        def cross_entropy():
            ce = F.cross_entropy(logits, labels[rows])
            return ce if pair is None else lam * ce + (1 - lam) * F.cross_entropy(logits, labels[rows][pair])
        if target is None:
            return cross_entropy(), logits
        T = options.distill_temperature if labels is not None else 1.0
        distill = F.kl_div(F.log_softmax(logits / T, dim=1), F.log_softmax(target / T, dim=1),
                           log_target=True, reduction="batchmean") * T * T
        if labels is None:
            return distill, logits
        w = options.distill_weight
        return (1 - w) * cross_entropy() + w * distill, logits

    if held_out is None:  # a seeded val_fraction of the rows
        shuffled = rng.permutation(data.rows)
        n_val = _held_out_count(data.rows, options)
        n_val = n_val - n_val % fixed if fixed else n_val
        held, rest = shuffled[:n_val], shuffled[n_val:]
    else:
        held = np.asarray(held_out, dtype=np.int64)
        held = held[:len(held) - len(held) % fixed] if fixed else held
        rest = np.setdiff1d(np.arange(data.rows), held)
    val, fit_rows, n_val = torch.from_numpy(held), torch.from_numpy(group.shard(rest)), len(held)
    parallel = data_parallel(program, group)
    batches = max(1, (len(fit_rows) - (fixed or 1)) // step + 1)
    opt = torch.optim.Adam(params, lr=lr)
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * batches, pct_start=0.15)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))  # stepped per epoch
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    started = time.perf_counter()

    def evaluate_held_out(net=program) -> tuple[float | None, float | None]:
        if not n_val:
            return None, None
        with torch.no_grad():
            loss, logits = losses(val, False, net)
        acc = None if labels is None else float((logits.argmax(1) == labels[val][:len(logits)]).float().mean())
        return float(loss), acc

    if teacher_program is not None and n_val:
        curve.reference_loss, curve.reference_accuracy = evaluate_held_out(teacher_program)
    luts = list(program.lut_modules().values())

    def snapshot() -> list[torch.Tensor]:  # the split dimensions too, which a re-split changes
        return [p.detach().clone() for p in params] + [m.split_dims.clone() for m in luts]

    first = EpochRecord(0, None, *evaluate_held_out(), seconds=0.0)
    curve.epochs.append(first)
    best = (first.held_out_loss, snapshot())
    averaged = [p.detach().clone() for p in params] if ema > 0 else None
    steps_done = 0
    steps = progress(range(epochs)) if progress else range(epochs)
    for epoch in steps:
        order = fit_rows[torch.from_numpy(rng.permutation(len(fit_rows)))]
        total, count = 0.0, 0
        for start in range(0, len(order) - (fixed or 1) + 1, step):
            loss, _ = losses(order[start:start + step], True, parallel)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if averaged is not None:  # the decay warms up, so short runs are not dominated by the start
                steps_done += 1
                decay = min(ema, (1 + steps_done) / (10 + steps_done))
                with torch.no_grad():
                    for a, p in zip(averaged, params):
                        a.mul_(decay).add_(p.detach(), alpha=1 - decay)
            if schedule == "onecycle":
                sched.step()
            total, count = total + float(loss.detach()), count + 1
        if schedule == "cosine":
            sched.step()
        if resplit and resplit_every and (epoch + 1) % resplit_every == 0 and epoch + 1 < epochs:
            with _swapped(params, averaged, keep=True):  # re-split the average, which is what is kept
                changed = _resplit(program, resplit, inputs, rest, step, fixed, options.seed + epoch)
            for p in changed:
                opt.state.pop(p, None)
        with _swapped(params, averaged):  # the average is what is evaluated and kept
            record = EpochRecord(epoch + 1, total / max(count, 1), *evaluate_held_out(),
                                 seconds=time.perf_counter() - started)
            kept = snapshot()
        curve.epochs.append(record)
        if hasattr(steps, "set_postfix"):
            steps.set_postfix(loss=f"{record.train_loss:.3f}", **(
                {} if record.held_out_accuracy is None else {"held_out": f"{record.held_out_accuracy:.2%}"}))
        if best[0] is None or record.held_out_loss < best[0]:
            best = (record.held_out_loss, kept)
            curve.best_epoch = epoch + 1
    with torch.no_grad():
        for p, value in zip(params + [m.split_dims for m in luts], best[1]):
            p.copy_(value)
    trained = onnx.ModelProto()
    trained.CopyFrom(model)
    program.write_back(trained)
    return Trained(trained, curve)


def _rows_tensor(rows: np.ndarray) -> torch.Tensor:
    """The rows as a tensor sharing their memory: a memory-mapped training file (calibrate.read_npz)
    stays on disk, and batches read only their rows. Such a map is read-only, which torch warns
    of; nothing here writes to the inputs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(rows)


OBJECTIVES = ("auto", "kl", "mse")
RESPLIT_ROWS = 8192  # rows per node a re-split learns its trees on


def _objective(option: str, output: torch.Tensor) -> str:
    """The objective `option` (checked by train) means for a model whose output is `output`."""
    return option if option != "auto" else "kl" if output.dim() == 2 else "mse"


def _relative_squared_error(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """||output - target||^2 / ||target||^2, over the positions `mask` keeps when it lays out
    the output's leading axes ([batch, tokens] of a sequence model), else over everything."""
    weight = torch.ones(())
    if mask is not None and tuple(output.shape[:mask.dim()]) == tuple(mask.shape):
        weight = (mask != 0).to(output.dtype).reshape(*mask.shape, *[1] * (output.dim() - mask.dim()))
    error = ((output - target) ** 2 * weight).sum()
    return error / ((target ** 2) * weight).sum().clamp_min(1e-12)


@contextmanager
def _swapped(params: list[torch.Tensor], replacement: list[torch.Tensor] | None, keep: bool = False):
    """Within the block, `params` hold `replacement`'s values (if any); restored after, unless
    `keep`: then both the parameters and `replacement` hold what the block left."""
    if replacement is None:
        yield
        return
    kept = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, r in zip(params, replacement):
            p.copy_(r)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k, r in zip(params, kept, replacement):
                r.copy_(p) if keep else p.copy_(k)


def _resplit(program: TorchProgram, sources: dict[str, TreeSource], inputs: list[torch.Tensor],
             rows: np.ndarray, step: int, fixed: int | None, seed: int,
             max_rows: int = RESPLIT_ROWS) -> list[torch.Tensor]:
    """Learn the named lookups' trees afresh on their current inputs over `rows` (the same on
    every rank, so ranks stay identical), at most `max_rows` rows per node sampled evenly
    across batches; return the parameters replaced."""
    modules = {n: m for n, m in program.lut_modules().items() if n in sources}
    rng = np.random.default_rng(seed)
    batches = [rows[i:i + step] for i in range(0, len(rows) - (fixed or 1) + 1, step)]
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in modules}

    def capture(name):
        def hook(module, args):
            flat = args[0].detach().reshape(-1, module.D).float()
            share = -(-max_rows // len(batches))
            if len(flat) > share:
                flat = flat[torch.from_numpy(np.sort(rng.choice(len(flat), share, replace=False)))]
            captured[name].append(flat)
        return hook
    hooks = [m.register_forward_pre_hook(capture(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                program(*[x[torch.from_numpy(batch)] for x in inputs])
    finally:
        for h in hooks:
            h.remove()
    changed = []
    for name, module in modules.items():
        X = torch.cat(captured[name])
        with torch.no_grad():
            current = (module.linear(X) - module.bias).double().numpy()
        module.replace_trees(*refit_trees(X.numpy(), current, sources[name]))
        changed += [module.thresholds, module.tables]
    return changed


def held_out_rows(rows: int, options: FinetuneOptions) -> np.ndarray:
    """The seeded, sorted `val_fraction` of `rows` that picks the epoch (none under 100 rows)."""
    return np.sort(np.random.default_rng([options.seed, 1]).permutation(rows)[:_held_out_count(rows, options)])


def _held_out_count(rows: int, options: FinetuneOptions) -> int:
    return int(rows * options.val_fraction) if rows >= 100 else 0


def _fixed_batch(model: onnx.ModelProto, input_names: list[str]) -> int | None:
    """The batch size the model's inputs fix (their first dimension), or None if it is free."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    fixed = {d[0].dim_value for name in input_names if (d := dims.get(name)) and d[0].HasField("dim_value")}
    return fixed.pop() if len(fixed) == 1 and 0 not in fixed else None
