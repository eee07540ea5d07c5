"""Loader throughput: DALI's CPU pipeline vs the torch DataLoader on the same generated JPEG folder,
same worker/thread count, images/s of one full pass (train: random-resized-crop + flip; val: resize +
centre crop; both 224 px, normalised float32 NCHW).

Run explicitly (bench/ is not collected by the test command):
    python -m pytest bench/bench_loader.py --benchmark-only
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import DataConfig
from engine.data import build_loaders

N_PER_CLASS, CLASSES = 64, 4          # 256 images per split
WORKERS = int(os.environ.get("HCD_BENCH_WORKERS", "2"))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo_like(rng, w, h):
    """Smooth colour gradients plus mild noise: decodes like a photo, unlike pure noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = [np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)) + np.cos(y / rng.uniform(20, 80))
            for _ in range(3)]
    img = (np.stack(base, -1) * 60 + 128 + rng.normal(0, 8, (h, w, 3))).clip(0, 255)
    return Image.fromarray(img.astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_jpegs")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(N_PER_CLASS):
                w, h = int(rng.integers(300, 500)), int(rng.integers(250, 450))   # ImageNet-like sizes
                _photo_like(rng, w, h).save(root / split / f"c{c}" / f"{i:03d}.jpg", quality=90)
    return root


def _dali_ok():
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not _dali_ok(), reason="nvidia.dali is not importable"))])
def test_loader_throughput(benchmark, folder, backend, split):
    torch.set_num_threads(1)  # the main process only normalises; workers/threads do the decoding
    cfg = DataConfig(root=str(folder), loader=backend, batch_size=32, num_workers=WORKERS, img_size=224)
    train, val = build_loaders(cfg, MEAN, STD, device=torch.device("cpu"))
    loader = train if split == "train" else val
    epoch = iter(range(1000))

    def one_pass():
        loader.set_epoch(next(epoch))
        return sum(len(labels) for _, labels in loader)

    n = benchmark.pedantic(one_pass, rounds=3, iterations=1, warmup_rounds=1)
    assert n == loader.num_samples
    benchmark.extra_info.update(images=n, workers=WORKERS,
                                images_per_s=round(n / benchmark.stats.stats.mean, 1))
