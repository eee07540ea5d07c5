"""The `hcd train` smoke run of bench/gpu_check.sh, its two non-GPU parts:

    python3 bench/train_smoke.py data DIR      # train/ and val/ of random-noise JPEG class folders (~256 px)
    python3 bench/train_smoke.py table RUN     # RUN/metrics.jsonl's train and eval rows as a short table

Noise carries no class signal: the run proves that the real config trains end to end (loader, teacher,
DeepSpeed, checkpoints, export) and that the loss falls as the student fits the batches, not accuracy.
"""
import json
import sys
from pathlib import Path

import numpy as np

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 64, 16


def write_jpeg_folder(root, classes=CLASSES, train=TRAIN_PER_CLASS, val=VAL_PER_CLASS, seed=0) -> Path:
    """root/{train,val}/c<k>/<i>.jpg: uniform noise, 240-288 x 240-288 px, quality 90."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(240, 289, size=2)
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def metrics_table(run) -> str:
    """The train rows (step, loss and its parts, lr, images/s) and eval rows of a run folder, and whether the
    loss fell from the first train row to the last."""
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    cols = ("loss", "ce", "kd", "sce", "skl", "ol")
    lines = [f"{'step':>5} {'epoch':>6} " + " ".join(f"{c:>7}" for c in cols) + f" {'lr':>8} {'img/s':>8}"]
    for r in rows:
        if r.get("kind") == "train":
            lines.append(f"{r['step']:>5} {r['epoch']:>6.2f} " + " ".join(f"{r.get(c, float('nan')):>7.4f}" for c in cols)
                         + f" {r['lr']:>8.4f} {r['images_per_s']:>8.1f}")
        elif r.get("kind") == "eval":
            lines.append(f"eval at step {r['step']} (epoch {r['epoch']:g}): student val top-1 {r['val_top1']:.2f}%")
    if len(train) >= 2:
        first, last = train[0]["loss"], train[-1]["loss"]
        lines.append(f"loss {first:.4f} -> {last:.4f}: {'falling' if last < first else 'NOT falling'}")
    return "\n".join(lines)


def main(argv) -> int:
    if len(argv) != 2 or argv[0] not in ("data", "table"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "data":
        print(f"wrote {write_jpeg_folder(argv[1])}")
    else:
        print(metrics_table(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
