"""data.train_interpolation: timm's `random` (bilinear or bicubic, chosen per image) in both loaders."""
import numpy as np
import pytest
import torch
from PIL import Image

from hcd.engine.config import DataConfig
from hcd.engine.data import build_loaders
from hcd.engine.data.transforms import train_interpolation, train_transform

from .jpegs import BACKENDS, MEAN, STD


def _noise(seed: int, w=80, h=70) -> Image.Image:  # large enough that every crop is resized
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_random_interpolation_is_per_sample_deterministic_and_uses_both():
    img = _noise(0)
    seen = []
    for epoch in (0, 1):
        for i in range(16):
            def rng():
                return np.random.default_rng([7, epoch, i])
            got = train_transform(img, 16, rng(), "random")
            assert torch.equal(got, train_transform(img, 16, rng(), "random"))  # a function of (seed, epoch, i)
            fixed = {m: train_transform(img, 16, rng(), m) for m in ("bilinear", "bicubic")}
            assert not torch.equal(fixed["bilinear"], fixed["bicubic"])
            # the same crop and flip as a fixed interpolation: only the resize filter is drawn
            match = [m for m, x in fixed.items() if torch.equal(got, x)]
            assert len(match) == 1
            seen.append(match[0])
    assert {"bilinear", "bicubic"} == set(seen)
    assert seen[:16] != seen[16:]  # another epoch, other choices
    assert {train_interpolation(np.random.default_rng(k), "bicubic").value for k in range(8)} == {"bicubic"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_choose_per_image(tmp_path, backend):
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "val" / c).mkdir(parents=True)
        for k in range(6):
            _noise(100 * ord(c) + k, 80 + 3 * k, 70 + 2 * k).save(tmp_path / "train" / c / f"{k}.jpg", quality=95)
        _noise(ord(c)).save(tmp_path / "val" / c / "0.jpg", quality=95)

    def batches(mode):
        cfg = DataConfig(root=str(tmp_path), loader=backend, batch_size=12, num_workers=0, img_size=16,
                         train_interpolation=mode)
        train, _ = build_loaders(cfg, MEAN, STD, rank=0, world_size=1, seed=3, device=torch.device("cpu"))
        train.set_epoch(0)
        return next(iter(train))

    (rand, labels), (lin, lin_labels), (cub, _) = batches("random"), batches("bilinear"), batches("bicubic")
    assert torch.equal(labels, lin_labels)  # the same files in the same order: only the filter differs
    is_lin = [torch.equal(rand[k], lin[k]) for k in range(12)]
    is_cub = [torch.equal(rand[k], cub[k]) for k in range(12)]
    assert all(a != b for a, b in zip(is_lin, is_cub))  # each image is exactly one of the two
    assert any(is_lin) and any(is_cub)
