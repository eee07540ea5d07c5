"""train.precision on CPU: bf16 / fp16 run the forward under DeepSpeed's torch_autocast with fp32 weights,
BatchNorm statistics and optimizer (timm's and OFA-KD's AMP); bf16-pure is DeepSpeed's bf16 module (16-bit
weights and, through match_buffers, BatchNorm statistics), as `bf16` was before. fp16-pure cannot run here:
DeepSpeed's fp16 module mode refuses the CPU accelerator ("Type fp16 is not supported on your device")."""
import copy
import math
from pathlib import Path

import pytest
import torch

from hcd.engine import trainer
from hcd.engine.config import ConfigError, load_config

CPU = torch.device("cpu")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _run(cfg):
    """(Run for trainer._micro_step, plain-torch copy of the distiller before DeepSpeed saw it)."""
    from hcd.engine.distiller import build_distiller
    from hcd.engine.distributed import build_engine, process_env
    from hcd.engine.health import StepHealth
    from hcd.engine.metrics import MetricWindow
    from hcd.engine.speed import prepare_models
    d = process_env()
    teacher, distiller, _, _ = build_distiller(cfg, CPU)
    teacher_fn = prepare_models(cfg, teacher, distiller, CPU)
    reference = copy.deepcopy(distiller)
    engine = build_engine(cfg, distiller, d, lambda step: 1.0 / (1 + step))
    engine.train()
    run = trainer.Run(cfg, d, Path("."), engine, teacher_fn, None, None, None, None,
                      MetricWindow(cfg.data.batch_size), 10 ** 6, trainer.TrainState(), health=StepHealth(CPU))
    return run, reference


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.data.batch_size, cfg.data.img_size
    return torch.randn(b, 3, s, s, generator=g), torch.randint(0, cfg.model.num_classes, (b,), generator=g)


def _step(run, images, labels):
    trainer._micro_step(run, images, labels)
    run.micro = 0


def _bn(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16-pure"])
def test_weights_batchnorm_loss_eval_and_export_per_mode(tmp_path, write_config, precision):
    from hcd.engine.evaluate import student_forward
    from hcd.engine.export import student_state_dict
    cfg = load_config(write_config(tmp_path), (f"train.precision={precision}",))
    run, reference = _run(cfg)
    images, labels = _batch(cfg)
    f_t, z_t = run.teacher(images)
    assert f_t.dtype == (torch.float32 if precision == "fp32" else HALF[precision[:4]])  # teacher 16-bit
    # the engine's first loss is the plain-torch one of the same weights and batch: under torch.autocast in
    # the autocast modes, on the bf16-converted module (buffers too) in bf16-pure. The same ops in the same
    # order on CPU, so equal up to fp32 summation order (1e-6); autocast itself moves the loss by ~1e-3, so
    # a forward that missed (or added) autocast fails here.
    mode = precision.removesuffix("-pure")
    if precision == "bf16-pure":
        reference.to(torch.bfloat16)
        x = images.to(torch.bfloat16)
    else:
        x = images
    with torch.autocast("cpu", dtype=HALF.get(precision, torch.bfloat16), enabled=precision in HALF):
        ref = reference(x, labels, f_t, z_t).loss.item()
    plain = copy.deepcopy(reference).float()(images, labels, f_t, z_t).loss.item()   # fp32, no autocast
    loss = run.engine(images.to(run.engine.module.student.model.conv1.weight.dtype), labels, f_t, z_t)[0].item()
    assert loss == pytest.approx(ref, rel=1e-6), (loss, ref)
    if precision != "fp32":
        assert abs(plain - ref) > 1e-5 * abs(ref), (plain, ref)  # the check above can tell the modes apart
    before = [bn.running_var.float().clone() for bn in _bn(run.engine.module.student)]
    _step(run, *_batch(cfg, 1))
    weights = {p.dtype for p in run.engine.module.parameters()}
    stats = {b.dtype for bn in _bn(run.engine.module) for b in (bn.running_mean, bn.running_var)}
    assert weights == stats == {torch.bfloat16 if precision == "bf16-pure" else torch.float32}
    assert run.engine.client_optimizer.param_groups[0]["params"][0].dtype == torch.float32  # fp32 optimizer
    after = [bn.running_var.float() for bn in _bn(run.engine.module.student)]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # BatchNorm kept updating its statistics
    # evaluation runs as the forward does: under autocast in bf16 / fp16
    run.engine.eval()
    student = copy.deepcopy(run.engine.module.student).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=HALF.get(precision, torch.bfloat16), enabled=precision in HALF):
        expect = student(images.to(next(student.parameters()).dtype))[0]
    got = student_forward(run.engine)(images)
    assert got.dtype == expect.dtype and torch.equal(got, expect)
    # export: fp32 tensors; the autocast modes' BatchNorm statistics are fp32 values, bf16-pure's sit on the
    # bf16 grid (they were kept in bf16), its weights are the fp32 masters (off the grid)
    sd = student_state_dict(run.engine, 0, 0)  # (export_student writes every tensor in fp32)
    assert {sd[n].dtype for n, _ in run.engine.module.student.model.named_parameters()} == {torch.float32}
    var, w = sd["bn1.running_var"].float(), sd["conv1.weight"]
    on_grid = lambda t: (t == t.to(torch.bfloat16).float()).float().mean().item()  # noqa: E731
    assert on_grid(var) == 1.0 if precision == "bf16-pure" else on_grid(var) < 0.5
    assert on_grid(w) < 0.5
    run.engine.destroy()


def test_fp16_loss_scaling_keeps_a_nonfinite_loss_off_the_weights(tmp_path, write_config, monkeypatch):
    """fp16 (ZeRO-0): DeepSpeed's torch GradScaler replaces the optimizer's found_inf with its own, which sees
    only non-finite gradients; a NaN loss whose gradients are finite must still change no weight, count as a
    non-finite step, and (as GradScaler does for non-finite gradients) halve the loss scale."""
    from hcd.engine.distributed import EngineModule
    cfg = load_config(write_config(tmp_path), ("train.precision=fp16",))
    run, _ = _run(cfg)
    scaler = run.engine.torch_autocast_z0_gradscaler
    assert scaler is not None
    _step(run, *_batch(cfg, 0))
    scale = scaler.get_scale()
    real = EngineModule.forward
    def nan_loss(self, *args):  # a NaN loss with finite gradients
        loss, *rest = real(self, *args)
        return (loss + float("nan"), *rest)
    monkeypatch.setattr(EngineModule, "forward", nan_loss)
    w = {n: p.detach().clone() for n, p in run.engine.module.named_parameters()}
    _step(run, *_batch(cfg, 1))
    assert all(torch.equal(p, w[n]) for n, p in run.engine.module.named_parameters())
    assert run.health.read() == (1, 1) and scaler.get_scale() == scale / 2
    monkeypatch.setattr(EngineModule, "forward", real)
    _step(run, *_batch(cfg, 2))
    assert any(not torch.equal(p, w[n]) for n, p in run.engine.module.named_parameters())
    from hcd.engine.health import scaler_state
    assert scaler_state(run.engine)["grad_scaler"]["scale"] == scale / 2  # what a checkpoint carries
    run.engine.destroy()


def test_the_schedule_follows_the_step_count_when_deepspeed_skips_a_step(tmp_path, write_config):
    """ZeRO-1 skips a step with non-finite gradients itself (as fp16-pure's loss scaler skips overflowing
    ones) and then does not step the LR schedule: the trainer steps it, so the LR follows the steps."""
    cfg = load_config(write_config(tmp_path), ("deepspeed.zero_stage=1",))
    run, _ = _run(cfg)
    images, labels = _batch(cfg)
    _step(run, images, labels)
    _step(run, torch.full_like(images, float("nan")), labels)
    assert not run.engine.was_step_applied() and run.engine.skipped_steps == 1
    assert run.engine.get_lr()[0] == pytest.approx(cfg.optim.lr / 3)  # lambda(2) = 1/3
    run.engine.destroy()


def test_precision_configs_and_layouts(tmp_path, write_config):
    from hcd.engine.distributed import deepspeed_config
    from hcd.engine.layout import check_layout, legacy_precision, run_layout
    path = write_config(tmp_path)
    ds = {p: deepspeed_config(load_config(path, (f"train.precision={p}", "deepspeed.zero_stage=1")), 1)
          for p in ("fp32", "bf16", "bf16-pure", "fp16-pure")}
    assert ds["bf16"]["torch_autocast"] == {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": []}
    assert not ds["bf16"]["bf16"]["enabled"] and not ds["bf16"]["fp16"]["enabled"]
    assert ds["bf16-pure"]["bf16"]["enabled"] and not ds["bf16-pure"]["torch_autocast"]["enabled"]
    assert ds["bf16-pure"]["data_types"] == {"grad_accum_dtype": "fp32"} and ds["bf16"]["data_types"] == {}
    assert ds["fp16-pure"]["fp16"]["enabled"] and not ds["fp32"]["torch_autocast"]["enabled"]
    with pytest.raises(ConfigError, match="train.precision: fp16 .autocast. needs deepspeed.zero_stage 0"):
        deepspeed_config(load_config(path, ("train.precision=fp16", "deepspeed.zero_stage=1")), 1)
    layout = {p: run_layout(load_config(path, (f"train.precision={p}",)), 1) for p in ("bf16", "bf16-pure")}
    with pytest.raises(ConfigError, match="--resume: train.precision is bf16 but .* written with bf16-pure"):
        check_layout(layout["bf16-pure"], layout["bf16"], tmp_path)
    # a checkpoint written when `bf16` meant DeepSpeed's bf16 module (no "weights" in its layout) is bf16-pure
    old = {k: v for k, v in layout["bf16"].items() if k != "weights"}
    check_layout(legacy_precision(old), layout["bf16-pure"], tmp_path)
    with pytest.raises(ConfigError, match="train.precision is bf16 but"):
        check_layout(legacy_precision(old), layout["bf16"], tmp_path)
