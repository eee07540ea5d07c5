"""The embedded default dataset: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes, shipped
inside sklearn, so it works offline) written once as an ImageNet-style JPEG folder:
root/train/<0..9>/<index>.jpg and root/val/<0..9>/<index>.jpg (seeded stratified 80/20 split,
upscaled to 32x32 RGB). The demo then goes through the same loaders as ImageNet.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

# Bump when the written layout or pixels change, so old caches are rebuilt rather than reused.
FORMAT = "digits-v1"
SIZE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def default_cache_root() -> Path:
    env = os.environ.get("HCD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hcd"


def _is_complete(root: Path) -> bool:
    marker = root / ".complete"
    return marker.is_file() and marker.read_text().strip() == FORMAT


def _split(labels: np.ndarray) -> np.ndarray:
    """Boolean val mask: per class, a seeded VAL_FRACTION of its samples (stratified)."""
    rng = np.random.default_rng(SPLIT_SEED)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_val[idx[: round(len(idx) * VAL_FRACTION)]] = True
    return is_val


def _write(folder: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)  # values 0..16
    labels = digits.target.astype(np.int64)
    is_val = _split(labels)
    for split in ("train", "val"):
        for c in range(10):
            (folder / split / str(c)).mkdir(parents=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        split = "val" if is_val[i] else "train"
        im = Image.fromarray(img).resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")
        im.save(folder / split / str(label) / f"{i:04d}.jpg", quality=95)
    (folder / ".complete").write_text(FORMAT + "\n")


def build_digits(root: Optional[str] = None) -> Path:
    """Write the digits folder (once) and return its path. Written into a temporary sibling folder and
    renamed into place, so an interrupted or concurrent build (several ranks) never leaves a half
    folder that looks complete."""
    root = Path(root) if root is not None else default_cache_root() / "digits"
    if _is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write(tmp)
        if root.exists() and not _is_complete(root):
            shutil.rmtree(root, ignore_errors=True)  # a stale incomplete folder from an older format
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root):  # someone else's rename won only if theirs is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


SUBSET_LIST = "train-{per_class}-per-class-x{repeats}.txt"  # a balanced labelled subset of root/train, in root


def write_subset_list(root, per_class: int, repeats: int = 1, seed: int = 0) -> Path:
    """root/train-<per_class>-per-class-x<repeats>.txt: a seeded, class-balanced subset of the digits train
    split as a "relative/path label" file list (data.train_list), for a student that sees few labels while
    its teacher saw them all. Each image is listed `repeats` times, so one epoch is that many passes over
    the subset, each with its own augmentation (fewer epoch ends: checkpoints and evaluations). Same
    (per_class, seed), same images; written atomically, once."""
    root = Path(root)
    path = root / SUBSET_LIST.format(per_class=per_class, repeats=repeats)
    if path.is_file():
        return path
    rng = np.random.default_rng([seed, per_class])
    lines = []
    for c in range(10):
        files = sorted(f.name for f in (root / "train" / str(c)).iterdir())
        if len(files) < per_class:
            raise ValueError(f"per_class: {per_class} exceeds the {len(files)} train images of class {c}")
        lines += [f"{c}/{name} {c}\n" for name in sorted(rng.choice(files, per_class, replace=False))]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(lines) * repeats)
    os.replace(tmp, path)
    return path
