"""Loader throughput for `hcd bench` and bench/bench_loader.py: DALI's CPU pipeline vs the torch DataLoader
on one generated folder of photo-like JPEGs, same worker/thread count, images/s of whole passes."""
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hcd.engine.data.build import dali_available  # noqa: F401  (re-exported for bench/)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo_like(rng, w, h):
    """Smooth colour gradients plus mild noise: decodes like a photo, unlike pure noise."""
    from PIL import Image
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = [np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)) + np.cos(y / rng.uniform(20, 80))
            for _ in range(3)]
    img = (np.stack(base, -1) * 60 + 128 + rng.normal(0, 8, (h, w, 3))).clip(0, 255)
    return Image.fromarray(img.astype(np.uint8))


def make_photo_folder(root, n_per_class=64, classes=4, seed=0) -> Path:
    """train/ and val/ of `classes` class folders with ImageNet-like sizes (300-500 x 250-450, quality 90)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                w, h = int(rng.integers(300, 500)), int(rng.integers(250, 450))
                _photo_like(rng, w, h).save(root / split / f"c{c}" / f"{i:03d}.jpg", quality=90)
    return root


def build_pass(folder, backend, split, workers, batch_size=32, img_size=224):
    """A callable running one full pass over `split`; returns the number of images seen."""
    from hcd.engine.config import DataConfig
    from hcd.engine.data import build_loaders
    cfg = DataConfig(root=str(folder), loader=backend, batch_size=batch_size, num_workers=workers,
                     img_size=img_size)
    train, val = build_loaders(cfg, MEAN, STD, device=torch.device("cpu"))
    loader = train if split == "train" else val
    epochs = iter(range(10 ** 6))

    def one_pass():
        loader.set_epoch(next(epochs))
        return sum(len(labels) for _, labels in loader)
    return one_pass


def loader_rows(quick=False, workers=2) -> list:
    rounds = 1 if quick else 3
    backends = ["torch"] + (["dali"] if dali_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_photo_folder(tmp, n_per_class=16 if quick else 64)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the main process only normalises; workers/threads decode
        try:
            for split in ("train", "val"):
                for backend in backends:
                    one_pass = build_pass(folder, backend, split, workers)
                    one_pass()  # warm-up: worker start, DALI pipeline build
                    secs, n = [], 0
                    for _ in range(rounds):
                        t0 = time.perf_counter()
                        n = one_pass()
                        secs.append(time.perf_counter() - t0)
                    rows.append({"loader": backend, "split": split, "workers": workers, "images": n,
                                 "images_per_s": n / statistics.median(secs)})
        finally:
            torch.set_num_threads(threads)
    return rows
