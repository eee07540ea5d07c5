"""The speed switches (engine/speed.py) on CPU at tiny shapes: each changes how the models run, not what they
compute. 3 steps with channels_last and torch.compile of teacher, student and projectors log the losses of the
plain eager run within fp32 rounding; a 16-bit run keeps the frozen teacher's weights in its dtype."""
import pytest
import torch

from hcd.engine.cli import main


def test_channels_last_and_compile_give_the_eager_losses(tmp_path, write_config, train_rows):
    cfg = write_config(tmp_path)
    common = ["train", "--config", cfg, "--set", "train.max_steps=3", "--set", "train.export=false"]
    assert main([*common, "--out", str(tmp_path / "eager"), "--set", "train.channels_last=false",
                 "--set", "train.compile=none"]) == 0
    assert main([*common, "--out", str(tmp_path / "fast"), "--set", "train.channels_last=true",
                 "--set", "train.compile=all"]) == 0
    eager, fast = train_rows(tmp_path / "eager"), train_rows(tmp_path / "fast")
    assert [r["step"] for r in eager] == [r["step"] for r in fast] == [1, 2, 3]
    for a, b in zip(eager, fast):
        for key in ("loss", "ce", "kd", "sce", "skl", "ol"):
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-6), (a["step"], key)


def test_prepare_models_applies_each_switch(write_config, tmp_path):
    from hcd.engine.config import load_config
    from hcd.engine.distiller import build_distiller
    from hcd.engine.speed import input_layout, prepare_models, resolved
    cpu = torch.device("cpu")
    cfg = load_config(write_config(tmp_path), ("train.precision=bf16", "train.channels_last=true"))
    assert resolved(cfg, cpu) == (True, "none") and resolved(load_config(), torch.device("cuda")) == (True, "teacher")
    teacher, distiller, _, _ = build_distiller(cfg, cpu)
    teacher_fn = prepare_models(cfg, teacher, distiller, cpu)
    assert teacher_fn is teacher and {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in distiller.parameters()} == {torch.float32}  # DeepSpeed converts the trained side
    conv = teacher.model.patch_embed.proj.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert distiller.student.model.conv1.weight.is_contiguous()  # DeepSpeed's flat buffers need contiguous
    images = torch.randn(2, 3, 32, 32)
    assert input_layout(images, True).is_contiguous(memory_format=torch.channels_last)
    _, feats = distiller.student(input_layout(torch.randn(2, 3, 64, 64), True))  # activations follow the input
    assert all(f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous() for f in feats)
    f_t, z_t = teacher_fn(input_layout(images, True))
    assert f_t.dtype == z_t.dtype == torch.bfloat16 and torch.isfinite(z_t.float()).all()
