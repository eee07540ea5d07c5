"""Trainer-test fixtures. A tiny run config: ViT teacher (2 blocks, width 48) -> ResNet18 student with
heads on stages 3 and 4, 32 px synthetic images, a few steps. DeepSpeed start-up dominates their time."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hcd.engine.distributed import LAUNCHER_ENV_KEYS, free_port

ROOT = Path(__file__).resolve().parents[2]

TINY_YAML = """
seed: 0
model:
  teacher: vit_tiny_patch16_224
  teacher_kwargs: {img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 2}
  student: resnet18
  num_classes: 5
data:
  loader: synthetic
  batch_size: 8
  img_size: 32
  synthetic_train_size: 48
  synthetic_val_size: 20
head:
  stages: [3, 4]
loss:
  sublogit_kl_weight: 1.0
optim: {name: sgd, lr: 0.02, weight_decay: 1.0e-4}
schedule: {name: cosine, warmup_epochs: 0.5, update: step}   # per step: the resume tests see a new LR every step
train: {epochs: 2, log_every: 1}
"""


def _write_config(tmp_path) -> str:
    p = Path(tmp_path) / "tiny.yaml"
    p.write_text(TINY_YAML)
    return str(p)


def _torchrun(nproc: int, args, timeout=240) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m hcd.engine.cli ARGS` on the CPU accelerator (gloo)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in LAUNCHER_ENV_KEYS:
        env.pop(k, None)  # set by in-process runs of the same pytest session
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "-m", "hcd.engine.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _photo_folder(root, classes: int = 4, train: int = 8, val: int = 2) -> Path:
    """root/{train,val}/c<k>/<i>.jpg: small (36-48 px) noisy JPEGs whose mean colour depends on the class."""
    import numpy as np
    from PIL import Image
    root, rng = Path(root), np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(36, 49, size=2)
                base = np.array([60 * c, 255 - 60 * c, 128], dtype=np.int16)
                pixels = np.clip(base + rng.integers(-40, 41, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def _train_rows(run) -> list:
    import json
    return [r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


# Fixtures (not imports) so these helpers work whether or not tests/ is a package.
@pytest.fixture
def tiny_config(tmp_path):
    return _write_config(tmp_path)


@pytest.fixture(scope="module")
def write_config():
    return _write_config


@pytest.fixture(scope="session")
def torchrun():
    return _torchrun


@pytest.fixture(scope="session")
def photo_folder():
    return _photo_folder


@pytest.fixture(scope="session")
def train_rows():
    return _train_rows
