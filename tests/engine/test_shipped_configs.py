"""The shipped run configs name supported model families and give valid DeepSpeed configs."""
import json
from pathlib import Path

import pytest

from hcd.engine.config import load_config
from hcd.engine.models import STUDENT_FAMILIES, TEACHER_FAMILIES, TOKEN_STUDENT_FAMILIES, model_family
from hcd.engine.distributed import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_the_literature_pairs_are_shipped():
    names = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}
    assert {"cifar100/swin_tiny-resnet18.yaml", "cifar100/vit_small-resnet18.yaml", "cifar100/mixer_b16-resnet18.yaml",
            "cifar100/swin_tiny-mobilenetv2.yaml", "imagenet/deit_tiny-resnet18.yaml",
            "imagenet/swin_tiny-resnet18.yaml", "demo.yaml", "imagenet/convnext_tiny-deit_tiny.yaml",
            "cifar100/resnet50-deit_tiny.yaml", "cifar100/resnet50-swin_nano.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_models_and_deepspeed(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # config_file paths are relative to the repository root
    cfg = load_config(str(path))
    assert model_family(cfg.model.teacher, "model.teacher") in TEACHER_FAMILIES
    assert model_family(cfg.model.student, "model.student") in STUDENT_FAMILIES | TOKEN_STUDENT_FAMILIES
    ds = deepspeed_config(cfg, world=8)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert ds["train_batch_size"] == cfg.data.batch_size * cfg.train.grad_accum * 8


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_json_files(stage):
    data = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    assert data["zero_optimization"]["stage"] == stage


# OFA-KD's configs/imagenet/cnn.yaml and configs/cifar/cnn.yaml (Hao840/OFAKD), with the train.py defaults they
# leave as they are: --warmup-lr 1e-4, --decay-rate 0.1, --cooldown-epochs 0, --train-interpolation random
OFAKD = {"imagenet": dict(epochs=100, batch_size=64, lr=0.1, min_lr=1e-6, weight_decay=1e-4, sched="step",
                          decay_epochs=30, warmup_epochs=3, smoothing=0.1),
         "cifar100": dict(epochs=300, batch_size=128, lr=0.05, min_lr=1e-3, weight_decay=2e-3, sched="cosine",
                          warmup_epochs=3, smoothing=0.1)}


def _token_student(path) -> bool:
    """A config whose student is a token-sequence model (by name; its recipe is the ViT one, not cnn.yaml)."""
    import yaml
    student = yaml.safe_load(path.read_text())["model"]["student"]
    return model_family(student, "model.student") in TOKEN_STUDENT_FAMILIES


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name in OFAKD and not _token_student(p)],
                         ids=lambda p: p.name)
def test_recipe_configs_are_ofakd_cnn_yaml(path):
    cfg, ref = load_config(str(path)), OFAKD[path.parent.name]
    s = cfg.schedule
    assert (s.name, s.update, s.warmup_epochs, s.warmup_lr, s.min_lr) == (ref["sched"], "epoch", ref["warmup_epochs"],
                                                                          1e-4, ref["min_lr"])
    if s.name == "step":
        assert (s.step_epochs, s.gamma) == (ref["decay_epochs"], 0.1)
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay,
            cfg.loss.label_smoothing) == (ref["epochs"], ref["batch_size"], "sgd", ref["lr"], ref["weight_decay"],
                                          ref["smoothing"])
    assert cfg.data.train_interpolation == "random"


# OFA-KD's configs/{imagenet,cifar}/vit_mlp.yaml at 12eeba8 (what the token-student configs copy)
VIT_MLP = {"imagenet": dict(min_lr=1e-6, ema_decay=0.99996), "cifar100": dict(min_lr=1e-5, ema_decay=None)}


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name in VIT_MLP and _token_student(p)],
                         ids=lambda p: p.name)
def test_token_student_configs_are_ofakd_vit_mlp_yaml(path):
    cfg, ref = load_config(str(path)), VIT_MLP[path.parent.name]
    o, s, d, t = cfg.optim, cfg.schedule, cfg.data, cfg.train
    assert (o.name, o.lr, o.weight_decay, t.epochs, d.batch_size, cfg.loss.label_smoothing, t.grad_clip) == (
        "adamw", 5e-4, 0.05, 300, 128, 0.1, 5.0)
    assert (s.name, s.update, s.warmup_epochs, s.warmup_lr, s.min_lr) == ("cosine", "epoch", 20, 5e-7, ref["min_lr"])
    assert (d.auto_augment, d.reprob, d.mixup, d.cutmix, d.mixup_prob, d.mixup_switch_prob) == (
        "rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 1.0, 0.5)
    assert "drop_path_rate" not in cfg.model.student_kwargs and d.train_interpolation == "random"
    assert t.ema_decay == ref["ema_decay"]
