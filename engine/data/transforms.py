"""The torch loader's per-image transforms on PIL images, returning uint8 CHW tensors.

Train: random-resized-crop (area 0.08-1, ratio 3/4-4/3; torchvision's algorithm) resized with
data.train_interpolation + horizontal flip p=0.5. `random` is timm's (RandomResizedCropAndInterpolation):
bilinear or bicubic, a uniform choice per image. The randomness comes from a numpy Generator the caller seeds
per (seed, epoch, sample), so the augmentation of a sample does not depend on the worker count or on which
batches were skipped; the interpolation is drawn last, so crops and flips are those of a fixed interpolation.
Val: shorter side to floor(img_size / crop_pct), centre crop img_size, bilinear. Antialiased (PIL's resize),
as DALI's resize does by default.
"""
import math

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
BILINEAR = InterpolationMode.BILINEAR
INTERPOLATIONS = {"bilinear": (BILINEAR,), "bicubic": (InterpolationMode.BICUBIC,),
                  "random": (BILINEAR, InterpolationMode.BICUBIC)}  # timm's _RANDOM_INTERPOLATION


def rrc_box(rng: np.random.Generator, width: int, height: int, scale=SCALE, ratio=RATIO):
    """(top, left, h, w) of a random-resized-crop window; torchvision's RandomResizedCrop.get_params."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback: a centre crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_interpolation(rng: np.random.Generator, mode: str) -> InterpolationMode:
    """The resize's interpolation for one image: `mode`, or (random) a uniform choice of bilinear and bicubic."""
    choices = INTERPOLATIONS[mode]
    return choices[int(rng.integers(len(choices)))] if len(choices) > 1 else choices[0]


def train_transform(img, size: int, rng: np.random.Generator, interpolation: str = "random") -> torch.Tensor:
    top, left, h, w = rrc_box(rng, *img.size)
    flip = rng.random() < 0.5
    img = F.resized_crop(img, top, left, h, w, [size, size], train_interpolation(rng, interpolation),
                         antialias=True)
    return F.pil_to_tensor(F.hflip(img) if flip else img)


def val_transform(img, size: int, resize: int) -> torch.Tensor:
    img = F.resize(img, resize, BILINEAR, antialias=True)
    return F.pil_to_tensor(F.center_crop(img, [size, size]))
