"""The shipped run configs name supported model families and give valid DeepSpeed configs."""
import json
from pathlib import Path

import pytest

from hcd.engine.config import load_config
from hcd.engine.models import STUDENT_FAMILIES, TEACHER_FAMILIES, model_family
from hcd.engine.distributed import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_the_literature_pairs_are_shipped():
    names = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}
    assert {"cifar100/swin_tiny-resnet18.yaml", "cifar100/vit_small-resnet18.yaml", "cifar100/mixer_b16-resnet18.yaml",
            "cifar100/swin_tiny-mobilenetv2.yaml", "imagenet/deit_tiny-resnet18.yaml",
            "imagenet/swin_tiny-resnet18.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_models_and_deepspeed(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # config_file paths are relative to the repository root
    cfg = load_config(str(path))
    assert model_family(cfg.model.teacher, "model.teacher") in TEACHER_FAMILIES
    assert model_family(cfg.model.student, "model.student") in STUDENT_FAMILIES
    ds = deepspeed_config(cfg, world=8)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert ds["train_batch_size"] == cfg.data.batch_size * cfg.train.grad_accum * 8


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_json_files(stage):
    data = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    assert data["zero_optimization"]["stage"] == stage
