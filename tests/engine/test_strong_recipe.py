"""The strong recipe end to end (issue 17's "done when"): a DeiT-tiny student (small width and resolution) trained
from a CNN teacher with RandAugment, random erasing, Mixup + CutMix (soft targets through every loss) and an EMA
of its weights, on 2 processes under ZeRO-2: every method runs in one `hcd compare` launch and exports both the
student and its EMA; HCD stopped mid-epoch and resumed logs exactly the uninterrupted run's rows and ends with the
same EMA."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from hcd.engine.loss_config import METHODS

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 8, 2

STRONG_YAML = """
seed: 3
model:
  teacher: resnet18
  teacher_checkpoint: {teacher}
  student: deit_tiny_patch16_224
  student_kwargs: {{img_size: 32, patch_size: 4, embed_dim: 48, depth: 6, num_heads: 2}}
  num_classes: 4
data:
  root: {root}
  loader: torch
  num_workers: 0
  batch_size: 4
  img_size: 32
  auto_augment: rand-m9-mstd0.5-inc1
  reprob: 0.25
  mixup: 0.8
  cutmix: 1.0
head: {{stages: [1, 2, 3, 4]}}
loss: {{sublogit_kl_weight: 1.0}}
optim: {{name: adamw, lr: 5.0e-4, weight_decay: 0.05}}
schedule: {{name: cosine, warmup_epochs: 0.5, warmup_lr: 1.0e-5, update: step}}
train: {{epochs: 2, log_every: 1, grad_clip: 5.0, ema_decay: 0.9}}
deepspeed: {{zero_stage: 2}}
"""


@pytest.fixture(scope="module")
def strong_config(tmp_path_factory, photo_folder):
    import timm
    tmp = tmp_path_factory.mktemp("strong")
    torch.manual_seed(0)
    teacher = tmp / "teacher.pt"  # a fixed CNN teacher (untrained: the test is about the pipeline, not accuracy)
    torch.save(timm.create_model("resnet18", num_classes=CLASSES).state_dict(), teacher)
    path = tmp / "strong.yaml"
    root = photo_folder(tmp / "data", CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS)
    path.write_text(STRONG_YAML.format(teacher=teacher, root=root))
    return str(path)


def _rows(run: Path, kind: str) -> list:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_every_method_trains_the_strong_recipe_on_two_ranks_and_exports_the_ema(strong_config, tmp_path, torchrun):
    out = tmp_path / "compare"
    r = torchrun(2, ["compare", "--config", strong_config, "--methods", ",".join(METHODS), "--seeds", "1",
                     "--out", str(out), "--set", "train.epochs=1"], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    assert sorted(result["summary"]) == sorted(METHODS)
    import timm
    for method in METHODS:
        run = out / method / "seed-3"
        train, evals = _rows(run, "train"), _rows(run, "eval")
        assert [x["step"] for x in train] == [1, 2, 3, 4], method  # 32 images, 2 ranks x 4 per step
        assert all(math.isfinite(x["loss"]) for x in train), method
        assert {"val_top1", "val_top1_ema", "val_top5_ema"} <= set(evals[-1]), method
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert (saved["data"]["mixup"], saved["data"]["cutmix"], saved["train"]["ema_decay"]) == (0.8, 1.0, 0.9)
        for folder in ("student", "student_ema"):
            model = timm.create_model(f"local-dir:{run / folder}", pretrained=True)
            assert model.patch_embed.proj.weight.shape[0] == 48, (method, folder)
    ema = timm.create_model(f"local-dir:{out / 'hcd' / 'seed-3' / 'student_ema'}", pretrained=True)
    live = timm.create_model(f"local-dir:{out / 'hcd' / 'seed-3' / 'student'}", pretrained=True)
    assert not torch.equal(ema.head.weight, live.head.weight)  # decay 0.9 over 4 steps: not the live weights


def test_the_strong_recipe_resumes_exactly_on_two_ranks(strong_config, tmp_path, torchrun):
    common = ["train", "--config", strong_config]
    full = torchrun(2, [*common, "--out", str(tmp_path / "full")], timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    part = torchrun(2, [*common, "--out", str(tmp_path / "split"), "--set", "train.stop_at_step=3"], timeout=600)
    assert part.returncode == 0, part.stderr[-3000:]
    rest = torchrun(2, [*common, "--out", str(tmp_path / "split"), "--resume"], timeout=600)
    assert rest.returncode == 0, rest.stderr[-3000:]
    for kind in ("train", "eval"):
        a, b = _rows(tmp_path / "full", kind), _rows(tmp_path / "split", kind)
        assert len(a) == len(b) == (8 if kind == "train" else 2)
        for ra, rb in zip(a, b):  # bit for bit across the stop at step 3 (inside epoch 0)
            ra.pop("images_per_s", None), rb.pop("images_per_s", None)
            assert ra == rb, kind
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "student_ema.safetensors"))
    b = load_file(str(tmp_path / "split" / "student_ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
