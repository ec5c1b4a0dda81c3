"""Random image augmentation for the train stage (--augment).

Lookup models, with far more parameters in their tables than the layers they replace, overfit
a small training set; the shipped models themselves were trained with augmentation
(scripts/train_mnist_mlp.py, scripts/train_fashion_cnn.py), and the train stage can draw the
same kind of new rows: a random affine map per row (rotation, zoom, translation; torch's
affine_grid / grid_sample, bilinear, zero fill) and an optional horizontal flip. The teacher
runs on the augmented rows, as on mixup's.

Inputs of rank 4 are images [N, C, H, W] as they stand; any other float input needs `shape`
(C, H, W), which its per-row size must equal (a flat 784-wide MNIST row: 1x28x28).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import OptionsError


@dataclass(frozen=True)
class Augment:
    """Per row, uniformly: rotation in ±rotate degrees, zoom in 1 ± scale, translation in
    ±shift pixels on each axis; a horizontal flip with probability 0.5 when hflip."""

    rotate: float = 0.0
    scale: float = 0.0
    shift: float = 0.0
    hflip: bool = False
    shape: tuple[int, int, int] | None = None  # (C, H, W) of a flat input

    def check(self) -> None:
        for name in ("rotate", "scale", "shift"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise OptionsError(f"--augment {name} must be a number >= 0, got {value!r}")
        if self.scale >= 1:
            raise OptionsError(f"--augment scale must be below 1 (a zoom of 1 ± scale), got {self.scale}")
        if self.shape is not None and (len(self.shape) != 3 or min(self.shape) < 1):
            raise OptionsError(f"--augment shape must be C x H x W, each >= 1, got {self.shape!r}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x, augmented row by row; its shape and dtype are kept."""
        images = x.reshape(len(x), *self.image_shape(tuple(x.shape)))
        n, _, h, w = images.shape
        if self.rotate or self.scale or self.shift:
            u = torch.rand(n, 4, generator=generator) * 2 - 1
            angle = u[:, 0] * math.radians(self.rotate)
            zoom = 1 + u[:, 1] * self.scale
            # normalised coordinates span 2 over the image's width (height)
            move = u[:, 2:] * self.shift * 2 / torch.tensor([w, h], dtype=torch.float32)
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1),
                                 torch.stack([sin, cos, move[:, 1]], 1)], 1).to(images.dtype)
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
        if self.hflip:
            flip = torch.rand(n, generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return images.reshape(x.shape)

    def check_rows(self, inputs: dict) -> None:
        """A one-line OptionsError unless every float input of `inputs` ({name: array}) can be
        augmented: checked before the compile begins, so a wrong shape costs no fitting."""
        for name, rows in inputs.items():
            if rows.dtype.kind == "f":
                self.image_shape(tuple(rows.shape), name)

    def image_shape(self, shape: tuple[int, ...], name: str = "the input") -> tuple[int, int, int]:
        """(C, H, W) of the rows of an input of `shape` (batch first)."""
        if self.shape is not None:
            size = math.prod(self.shape)
            if math.prod(shape[1:]) != size:
                raise OptionsError(f"--augment shape {'x'.join(map(str, self.shape))} holds {size} values, "
                                   f"but the rows of {name} hold {math.prod(shape[1:])}")
            return self.shape
        if len(shape) != 4:
            raise OptionsError(f"--augment needs shape=CxHxW for {name} of shape {list(shape)} "
                               f"(only [N, C, H, W] inputs are images as they stand)")
        return shape[1:]


def parse_augment(text: str) -> Augment:
    """'rotate=15,scale=0.15,shift=2,hflip,shape=1x28x28' -> Augment (the CLI's --augment)."""
    fields: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        key = key.strip()
        try:
            if key == "hflip" and not value:
                fields["hflip"] = True
            elif key in ("rotate", "scale", "shift") and value:
                fields[key] = float(value)
            elif key == "shape" and value:
                fields["shape"] = tuple(int(v) for v in value.lower().split("x"))
            else:
                raise ValueError
        except ValueError:
            raise OptionsError(f"--augment: cannot read {part!r}; expected rotate=DEG, scale=F, shift=PX, "
                               f"hflip or shape=CxHxW, separated by commas") from None
    augment = Augment(**fields)
    augment.check()
    return augment
