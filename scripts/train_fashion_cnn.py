"""Train a small CNN on real Fashion-MNIST (official 60k/10k split) and export it to ONNX.

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``,
read by ``scripts/datasets.py``).  The model is trained on the 60,000 official
training images; the 10,000 official test images are used for nothing but the
final measurement.

Architecture (all convolutions group=1, no BatchNorm)::

    input [B,1,28,28] -> Conv(1->16,3x3,pad 1) Relu MaxPool2  -> [B,16,14,14]
                      -> Conv(16->32,3x3,pad 1) Relu MaxPool2 -> [B,32,7,7]
                      -> Conv(32->64,3x3,pad 1) Relu MaxPool2 -> [B,64,3,3]
                      -> Flatten -> Gemm(576->128) Relu -> Gemm(128->10) = logits

Writes into ``--out-dir`` (default ``models/``):

* ``fashion_cnn.onnx``  -- opset 17, input ``input`` float32 [batch, 1, 28, 28]
  (pixels / 255), output ``logits`` float32 [batch, 10].
* ``fashion_calib.npz`` -- ``input`` float32 [2000, 1, 28, 28], ``labels`` int64 [2000]:
  rows drawn with a fixed seed from the official TRAIN split (for calibration).
* ``fashion_test.npz``  -- the 10,000 official test images, same keys, file order.
* ``fashion_cnn.json``  -- data source, split, hyper-parameters, accuracies
  (the test accuracy is the one onnxruntime gets on ``fashion_test.npz``).

Usage::

    python scripts/train_fashion_cnn.py [--fashion-dir DIR] [--out-dir models]

``--val N`` instead holds out N of the 60,000 training images (stratified by
class) as a validation set and only reports accuracy on it (nothing is
written): that is how the hyper-parameters were chosen, without looking at the
test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import FASHION_MNIST_DIR, load_fashion_mnist, sha256, stratified_split  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEB_PACKAGE = "dataset-fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CHANNELS = (1, 16, 32, 64)
HIDDEN = 128
N_CALIB = 2000
EVAL_BATCH = 1000

# How the defaults of TrainConfig were chosen (recorded verbatim in fashion_cnn.json).
HP_SELECTION = (
    "validation only: --val 6000 holds out 6,000 of the 60,000 training images (600 per class, "
    "stratified, --val-seed), trains on the other 54,000; the test split was not looked at. Fixed: the "
    "architecture, Adam, OneCycleLR (pct_start 0.2), batch 128, 6 epochs (the training-time budget: ~4-5 "
    "min on one shared core). Tried (val-seed = torch-seed 1000 unless noted): lr 1e-3 -> 89.38%; "
    "lr 3e-3 -> 91.48% (seed 1001: 91.20%); lr 3e-3 + random horizontal flip -> 91.13%; "
    "lr 6e-3 -> 91.82% / 91.75% / 91.88% (seeds 1000/1001/1002, mean 91.82%); "
    "lr 1e-2 -> 92.10% / 91.65% / 92.22% (seeds 1000/1001/1002, mean 91.99%). "
    "Chosen: lr 1e-2 (best mean), no augmentation, then retrained on all 60,000 training images"
)


@dataclass
class TrainConfig:
    torch_seed: int = 0
    calib_seed: int = 1
    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 0.0
    max_shift: int = 0  # random integer translation augmentation, pixels (0 = off)
    hflip: int = 0  # random horizontal flip augmentation, 1 = on
    threads: int = 1


def make_cnn() -> nn.Sequential:
    mods: list[nn.Module] = []
    for a, b in zip(CHANNELS[:-1], CHANNELS[1:]):
        mods += [nn.Conv2d(a, b, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    side = 28
    for _ in CHANNELS[1:]:
        side //= 2  # 28 -> 14 -> 7 -> 3
    mods += [nn.Flatten(), nn.Linear(CHANNELS[-1] * side * side, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10)]
    return nn.Sequential(*mods)




def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1]."""
    return images[:, None, :, :].astype(np.float32) / np.float32(255.0)


def augment_batch(xb: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip (p=0.5) and integer translation in [-max_shift, max_shift] px, zero fill."""
    n = xb.shape[0]
    if cfg.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
    if cfg.max_shift > 0:
        s = cfg.max_shift
        img = nn.functional.pad(xb, (s, s, s, s))
        d = torch.randint(-s, s + 1, (n, 2), generator=gen)
        ar = torch.arange(28)
        rows = (ar[None, :] + s - d[:, :1])[:, :, None]
        cols = (ar[None, :] + s - d[:, 1:])[:, None, :]
        xb = img[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    return xb


def augmentation_text(cfg: TrainConfig) -> str:
    parts = []
    if cfg.hflip:
        parts.append("random horizontal flip (p=0.5)")
    if cfg.max_shift > 0:
        parts.append(f"random integer translation in [-{cfg.max_shift}, {cfg.max_shift}] px, zero fill")
    return ("per sample per batch: " + ", ".join(parts)) if parts else "none"


def train(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, log=print,
          x_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> nn.Sequential:
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.torch_seed)
    gen = torch.Generator().manual_seed(cfg.torch_seed)
    model = make_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.2
    )
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        correct = 0
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = xt[idx]
            if cfg.hflip or cfg.max_shift > 0:
                xb = augment_batch(xb, cfg, gen)
            out = model(xb)
            loss = loss_fn(out, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((out.argmax(1) == yt[idx]).sum())
        if log:
            msg = (f"  epoch {epoch + 1:2d}/{cfg.epochs}  train loss {total / len(xt):.4f}  "
                   f"train acc (running) {correct / len(xt):.4f}  {time.time() - t0:.0f}s")
            if x_val is not None:
                model.eval()
                msg += f"  val acc {accuracy(torch_logits(model, x_val), y_val):.4f}"
            log(msg)
    model.eval()
    return model


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + EVAL_BATCH])).numpy()
                           for i in range(0, len(x), EVAL_BATCH)])


def ort_logits(sess, x: np.ndarray) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], {"input": x[i : i + EVAL_BATCH]})[0]
                           for i in range(0, len(x), EVAL_BATCH)])


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def export_onnx(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():  # the legacy-exporter DeprecationWarning is expected here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 28, 28),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )




def deb_version(package: str) -> str | None:
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                              capture_output=True, text=True, check=False)
    except OSError:
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fashion-dir", default=None,
                    help=f"folder with the Fashion-MNIST idx .gz files (default {FASHION_MNIST_DIR})")
    ap.add_argument("--out-dir", default=str(REPO / "models"))
    defaults = TrainConfig()
    for k, v in asdict(defaults).items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--val", type=int, default=0,
                    help="hold out this many TRAIN rows, report validation accuracy, write nothing")
    ap.add_argument("--val-seed", type=int, default=1000, help="seed of the --val split (within the train split)")
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})

    root = Path(args.fashion_dir) if args.fashion_dir else FASHION_MNIST_DIR
    tr_images, y_tr = load_fashion_mnist("train", root)
    x_tr = to_input(tr_images)
    print(f"data: Fashion-MNIST from {root}: train {len(y_tr)}")

    if args.val:
        keep, va = stratified_split(y_tr, args.val, args.val_seed)
        t0 = time.time()
        model = train(x_tr[keep], y_tr[keep], cfg, x_val=x_tr[va], y_val=y_tr[va])
        acc = accuracy(torch_logits(model, x_tr[va]), y_tr[va])
        print(f"config {asdict(cfg)} val_seed {args.val_seed}")
        print(f"validation accuracy {acc:.4f} on {len(va)} rows (trained on {len(keep)}), {time.time() - t0:.1f}s")
        return 0

    te_images, y_te = load_fashion_mnist("test", root)
    x_te = to_input(te_images)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    model = train(x_tr, y_tr, cfg)
    train_seconds = time.time() - t0
    print(f"trained in {train_seconds:.1f}s")

    onnx_path = out / "fashion_cnn.onnx"
    export_onnx(model, onnx_path)

    calib_rows = np.sort(np.random.default_rng(cfg.calib_seed).choice(len(y_tr), N_CALIB, replace=False))
    np.savez_compressed(out / "fashion_calib.npz", input=x_tr[calib_rows], labels=y_tr[calib_rows])
    np.savez_compressed(out / "fashion_test.npz", input=x_te, labels=y_te)

    # Check the exported model in onnxruntime against torch, on the saved files.
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(onnx_path))
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    conv_weights = [inits[n.input[1]] for n in m.graph.node if n.op_type == "Conv"]
    gemm_weights = [inits[n.input[1]] for n in m.graph.node if n.op_type == "Gemm"]
    test = np.load(out / "fashion_test.npz")
    calib = np.load(out / "fashion_calib.npz")
    assert test["input"].shape == (10000, 1, 28, 28) and test["input"].dtype == np.float32
    assert calib["input"].shape == (N_CALIB, 1, 28, 28) and calib["labels"].dtype == np.int64
    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg.threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    ort_te = ort_logits(sess, test["input"])
    ort_ca = ort_logits(sess, calib["input"])
    pt_te = torch_logits(model, test["input"])
    max_diff = float(np.abs(ort_te - pt_te).max())
    pred_te = ort_te.argmax(1)
    acc = {
        "test_onnxruntime": accuracy(ort_te, test["labels"]),
        "test_torch": accuracy(pt_te, test["labels"]),
        "test_argmax_disagreements_onnxruntime_vs_torch": int((pred_te != pt_te.argmax(1)).sum()),
        "train_onnxruntime": accuracy(ort_logits(sess, x_tr), y_tr),
        "calib_onnxruntime": accuracy(ort_ca, calib["labels"]),
    }
    n_correct = int((pred_te == test["labels"]).sum())
    per_class = {c: float((pred_te[test["labels"] == k] == k).mean()) for k, c in enumerate(CLASSES)}
    print(f"graph ops: {ops}")
    print(f"conv weights: {conv_weights}  gemm weights: {gemm_weights}")
    print(f"max |onnxruntime - torch| on test logits: {max_diff:.3e}")
    print(f"test accuracy  torch {acc['test_torch']:.4f}  onnxruntime {acc['test_onnxruntime']:.4f} "
          f"({n_correct}/{len(y_te)})")
    print(f"train accuracy {acc['train_onnxruntime']:.4f}  calib accuracy {acc['calib_onnxruntime']:.4f}")
    if max_diff > 1e-4:
        raise SystemExit(f"onnxruntime and torch disagree: max abs diff {max_diff}")

    files = ["fashion_cnn.onnx", "fashion_calib.npz", "fashion_test.npz"]
    version = deb_version(DEB_PACKAGE)
    meta = {
        "model": {
            "file": "fashion_cnn.onnx",
            "architecture": "CNN: 3 x [Conv 3x3 pad 1 (group 1) -> Relu -> MaxPool 2x2], channels "
                            f"{'->'.join(map(str, CHANNELS))}, then Flatten -> Gemm(576->{HIDDEN}) -> Relu "
                            f"-> Gemm({HIDDEN}->10); logits out (no softmax); no BatchNorm, no dropout",
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "onnx": {"opset": 17, "exporter": "torch.onnx.export(dynamo=False)",
                     "input": "input float32 [batch, 1, 28, 28] = pixels/255",
                     "output": "logits float32 [batch, 10]", "ops": ops,
                     "conv_weight_shapes": conv_weights, "gemm_weight_shapes": gemm_weights},
            "classes": list(CLASSES),
        },
        "data": {
            "source": f"Debian package {DEB_PACKAGE} {version or '(version unknown)'}: "
                      f"{root}/{{train,t10k}}-images-idx3-ubyte.gz and {{train,t10k}}-labels-idx1-ubyte.gz "
                      "(Fashion-MNIST, Zalando Research), read by scripts/datasets.py load_fashion_mnist",
            "deb_package": DEB_PACKAGE,
            "deb_version": version,
            "source_files": {
                f: {"bytes": (root / f).stat().st_size, "sha256": sha256(root / f)}
                for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                          "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
            },
            "split": {
                "method": "the official Fashion-MNIST split: the model is trained on all 60,000 train "
                          "images; the 10,000 t10k images are only used for the final measurement",
                "train": int(len(y_tr)),
                "test": int(len(y_te)),
                "train_class_counts": np.bincount(y_tr, minlength=10).tolist(),
                "test_class_counts": np.bincount(y_te, minlength=10).tolist(),
            },
            "calib": {"file": "fashion_calib.npz", "rows": N_CALIB,
                      "how": f"np.random.default_rng(calib_seed).choice(60000, {N_CALIB}, replace=False) over "
                             "the official train split (file order), sorted; keys input float32 "
                             f"[{N_CALIB},1,28,28], labels int64 [{N_CALIB}]; these rows were also trained on",
                      "calib_seed": cfg.calib_seed},
            "test": {"file": "fashion_test.npz", "rows": int(len(y_te)),
                     "how": "the whole official t10k split in file order; keys input float32 "
                            "[10000,1,28,28] = pixels/255, labels int64 [10000]"},
        },
        "training": {
            **asdict(cfg),
            "optimizer": "torch.optim.Adam (betas 0.9/0.999, eps 1e-8)",
            "lr_schedule": "OneCycleLR, max_lr=lr, pct_start=0.2, cosine anneal, stepped per batch",
            "loss": "cross entropy",
            "augmentation": augmentation_text(cfg),
            "init": "PyTorch default (torch.manual_seed(torch_seed))",
            "determinism": "torch.use_deterministic_algorithms(True), torch.set_num_threads(threads), "
                           "batch order and augmentation from torch.Generator().manual_seed(torch_seed)",
            "hyper_parameter_selection": HP_SELECTION,
            "train_seconds": round(train_seconds, 1),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "accuracy": {
            **acc,
            "test_correct": n_correct,
            "test_rows": int(len(y_te)),
            "test_per_class_onnxruntime": per_class,
            "max_abs_logit_diff_onnxruntime_vs_torch": max_diff,
            "onnxruntime": ort.__version__,
        },
        "files": {f: {"bytes": (out / f).stat().st_size, "sha256": sha256(out / f)} for f in files},
        "command": "python scripts/train_fashion_cnn.py" + (f" --fashion-dir {args.fashion_dir}" if args.fashion_dir else ""),
    }
    (out / "fashion_cnn.json").write_text(json.dumps(meta, indent=2) + "\n")
    for f in files + ["fashion_cnn.json"]:
        print(f"wrote {out / f} ({(out / f).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
