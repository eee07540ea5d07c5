"""`hcd bench`'s step rows on CPU at the tiny shape: they run end to end, the engine row is the trainer's own
micro-step on the DeepSpeed engine, the KD step has no heads, the ViT-recipe row mixes its targets and keeps
an EMA, and the engine step's breakdown has its ranges. No timing is asserted (timing belongs in benchmarks);
only that the numbers exist and are positive."""
import math
from collections import Counter

import pytest
import torch

from hcd.engine import trainer
from hcd.engine.bench.breakdown import RANGES
from hcd.engine.bench.step_build import STEP_CONFIG, VIT_CPU_OVERRIDES, engine_run, release, step_config
from hcd.engine.bench.step_rows import KINDS, step_rows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def measured():
    """The CPU step rows, with trainer._micro_step replaced by a wrapper counting its calls per distiller."""
    calls = Counter()
    real = trainer._micro_step

    def counting(run, images, labels):
        calls[type(run.engine.module.distiller).__name__] += 1
        calls["soft targets with an EMA"] += labels.dim() == 2 and run.ema is not None
        return real(run, images, labels)
    patch = pytest.MonkeyPatch()
    patch.setattr(trainer, "_micro_step", counting)
    try:
        rows = step_rows(CPU, quick=True, breakdown_steps=2)
    finally:
        patch.undo()
    return rows, calls


def test_step_rows_run_end_to_end_with_their_keys(measured):
    rows, _ = measured
    assert [r["kind"] for r in rows] == list(KINDS)
    for r in rows:
        assert {"name", "kind", "ms", "images_per_s", "vs_reference", "hcd_vs_kd", "setup", "breakdown"} <= set(r)
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0 and r["ms"] > 0
    engine = rows[1]
    assert engine["vs_reference"] > 0 and engine["hcd_vs_kd"] > 0
    setup = engine["setup"]
    assert setup["config"] == STEP_CONFIG and "model.num_classes=10" in setup["overrides"]
    assert (setup["img_size"], setup["batch"], setup["precision"], setup["compile"]) == (32, 16, "fp32", "none")


def test_engine_and_kd_rows_drive_the_trainers_micro_step(measured):
    """The three DeepSpeed rows went through trainer._micro_step (looked up at call time); the reference loop
    did not (it is the loop a user writes without the engine)."""
    _, calls = measured
    assert set(calls) == {"HCDDistiller", "LogitDistiller", "soft targets with an EMA"}
    assert calls["HCDDistiller"] >= 3 and calls["LogitDistiller"] >= 2  # timed steps, and the marked ones
    # the vit recipe row: every step's targets mixed into (B, C) rows, and the run keeps the config's EMA
    assert calls["soft targets with an EMA"] >= 4


def test_the_vit_recipe_row_is_a_deit_student_of_its_own_config(measured):
    rows, _ = measured
    vit = rows[3]["setup"]
    assert (vit["config"], vit["student"], vit["img_size"]) == ("imagenet/convnext_tiny-deit_tiny.yaml",
                                                                  "deit_tiny_patch16_224", 32)
    assert VIT_CPU_OVERRIDES[0] in vit["overrides"]  # the tiny DeiT student on CPU
    assert (vit["batch"], vit["precision"], vit["compile"]) == (16, "fp32", "none")


def test_breakdown_has_its_ranges(measured):
    rows, _ = measured
    bd = rows[1]["breakdown"]
    assert list(bd) == list(RANGES) + ["total"]
    assert all(v["host_ms"] >= 0 and v["device_ms"] is None for v in bd.values())  # no device time on CPU
    for name in ("teacher forward", "student forward", "projectors forward", "loss", "backward", "optimizer step"):
        assert bd[name]["host_ms"] > 0, name
    assert rows[0]["breakdown"] is None and rows[2]["breakdown"] is None


def test_kd_step_has_no_head_parameters():
    run = engine_run(step_config(CPU), "kd")
    try:
        names = [n for n, _ in run.engine.module.named_parameters()]
        assert names and all(n.startswith("distiller.student.") for n in names)
        assert run.engine.module.distiller.method == "kd" and not list(run.engine.module.distiller.projectors)
    finally:
        release(run)

