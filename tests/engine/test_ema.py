"""The EMA of the student (train.ema_decay, engine/ema.py): the update against a float64 reference, the config's
refusals, and on the tiny CPU runs: a stopped + resumed run's EMA and eval rows equal the uninterrupted run's bit
for bit, the export loads with timm and computes the EMA's logits, `hcd eval --ema`, a resume that turns the EMA
on or off, and a resume on another world size."""
import json

import pytest
import torch

from hcd.engine.checkpoint import read_ema, read_pointer
from hcd.engine.cli import main
from hcd.engine.config import ConfigError, load_config

DECAY = 0.9


def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    """A random training step's change of every parameter and BatchNorm statistic."""
    with torch.no_grad():
        for name, v in model.state_dict().items():
            if v.is_floating_point():
                step = torch.randn(v.shape, generator=gen, dtype=torch.float64)
                v.copy_((v.double() + step).abs() if "running_var" in name else v.double() + step)
            else:
                v.add_(1)  # num_batches_tracked


@pytest.mark.parametrize("dtype,warmup", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_the_ema_is_timms_average_in_fp32_of_every_weight_and_statistic(dtype, warmup):
    import timm

    from hcd.engine.ema import StudentEma
    gen = torch.Generator().manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=5)
    _perturb(model, gen)
    model.to(dtype)  # bfloat16: the 16-bit module weights of train.precision bf16-pure
    ema = StudentEma(model, DECAY, warmup, torch.device("cpu"))
    assert {v.dtype for v in ema.module.state_dict().values() if v.is_floating_point()} == {torch.float32}
    ref = {k: v.double() for k, v in model.state_dict().items()}
    for step in range(1, 6):
        _perturb(model, gen)
        ema.update(model, step)
        # timm's train.py passes the optimizer step: decay 0 at step 1 (a copy); with warm-up 1 - (1 + t)^(-2/3)
        # for t = step - 1, capped at the decay
        decay = 0.0 if step == 1 else min(DECAY, 1 - step ** (-2 / 3)) if warmup else DECAY
        for k, v in model.state_dict().items():
            ref[k] = decay * ref[k] + (1 - decay) * v.double() if v.is_floating_point() else v.double()
    got = ema.module.state_dict()
    for k, r in ref.items():
        if got[k].is_floating_point():
            torch.testing.assert_close(got[k].double(), r, rtol=1e-5, atol=1e-5, msg=k)
        else:
            assert torch.equal(got[k], r.long()), k
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("sets,field", [
    (["train.ema_decay=1.0"], "train.ema_decay"), (["train.ema_decay=-0.1"], "train.ema_decay"),
    (["train.ema_decay=0.999", "deepspeed.zero_stage=3"], "train.ema_decay"),
    (["train.ema_warmup=true"], "train.ema_warmup"),
])
def test_bad_ema_settings_are_one_line_errors_naming_the_field(sets, field):
    with pytest.raises(ConfigError, match=rf"^{field}: ") as e:
        load_config(None, tuple(sets))
    assert "\n" not in str(e.value)


def test_null_and_zero_mean_off():
    from hcd.engine.ema import build_ema
    for sets in ((), ("train.ema_decay=0",), ("train.ema_decay=null",)):
        assert build_ema(load_config(None, sets), torch.nn.Linear(2, 2), torch.device("cpu")) is None
    assert load_config(None, ("train.ema_decay=0.9", "deepspeed.zero_stage=2")).train.ema_decay == 0.9


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory, write_config):
    """The tiny run (12 steps; timm's 0.4M-parameter test_resnet student) with the EMA, whole, and stopped at
    step 5 (inside epoch 1) then resumed."""
    tmp = tmp_path_factory.mktemp("ema")
    cfg = write_config(tmp)
    args = ["train", "--config", cfg, "--set", f"train.ema_decay={DECAY}", "--set", "model.student=test_resnet"]
    full, split = tmp / "full", tmp / "split"
    assert main([*args, "--out", str(full)]) == 0
    assert main([*args, "--out", str(split), "--set", "train.stop_at_step=5", "--set", "train.export=false"]) == 0
    assert read_ema(split / "checkpoints", "step-00000005") is not None
    assert main([*args, "--out", str(split), "--resume"]) == 0
    return cfg, full, split


def _rows(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_a_stopped_and_resumed_run_keeps_the_uninterrupted_ema_bit_for_bit(ema_runs):
    _, full, split = ema_runs
    a, b = read_ema(full / "checkpoints", "step-00000012"), read_ema(split / "checkpoints", "step-00000012")
    assert a["module"].keys() == b["module"].keys()
    for k, v in a["module"].items():
        assert torch.equal(v, b["module"][k]), k
    assert (a["decay"], a["best_top1"]) == (b["decay"], b["best_top1"]) == (DECAY, max(
        r["val_top1_ema"] for r in _rows(full, "eval")))
    evals = _rows(full, "eval")
    assert evals == _rows(split, "eval") and len(evals) == 2
    assert all(0 <= r["val_top1_ema"] <= r["val_top5_ema"] <= 100 for r in evals)
    assert [r["best_top1_ema"] for r in evals] == [evals[0]["val_top1_ema"], a["best_top1"]]
    # the EMA is not the live student: after 12 steps at decay 0.9 its weights differ
    live = torch.load(full / "checkpoints" / "step-00000012" / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)["module"]
    w = next(iter(a["module"]))  # the first convolution's weight
    assert not torch.allclose(live[f"distiller.student.model.{w}"], a["module"][w])


def test_the_exported_ema_loads_with_timm_and_computes_the_emas_logits(ema_runs, capsys):
    import timm
    from safetensors.torch import load_file
    cfg, full, _ = ema_runs
    saved = read_ema(full / "checkpoints", "step-00000012")["module"]
    exported = timm.create_model(f"local-dir:{full / 'student_ema'}", pretrained=True).eval()
    reference = timm.create_model("test_resnet", num_classes=5).eval()
    reference.load_state_dict(saved)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(x), reference(x))
    assert tuple(exported.pretrained_cfg["input_size"]) == (3, 32, 32)  # the run's, not timm's 224 px
    # `hcd eval --ema` of the checkpoint scores what the trainer logged and exports the same weights there
    last = _rows(full, "eval")[-1]
    capsys.readouterr()
    sets = ["--set", "model.student=test_resnet"]
    assert main(["eval", "--config", cfg, *sets, "--ema", "--checkpoint", str(full / "checkpoints")]) == 0
    step = full / "checkpoints" / "step-00000012"
    assert f"student EMA test_resnet ({step}): val top-1 {last['val_top1_ema']:.2f}%  top-5 " \
           f"{last['val_top5_ema']:.2f}%" in capsys.readouterr().out
    again = load_file(str(step / "student_ema.safetensors"))
    first = load_file(str(full / "student_ema.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    # an export is evaluated without --ema; a checkpoint without an EMA has none to evaluate
    assert main(["eval", "--config", cfg, *sets, "--ema", "--checkpoint", str(full / "student_ema")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--ema: " in err and "without --ema" in err


def test_a_resume_turns_the_ema_on_from_the_resumed_weights_and_off(tmp_path, write_config, capsys):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    args = ["train", "--config", cfg, "--out", str(run), "--set", "train.export=false",
            "--set", "model.student=test_resnet"]
    assert main([*args, "--set", "train.max_steps=2"]) == 0
    states = lambda tag: torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt",  # noqa: E731
                                    map_location="cpu", weights_only=False)["module"]
    w2 = states("step-00000002")
    capsys.readouterr()
    assert main([*args, "--set", "train.max_steps=3", "--set", "train.ema_decay=0.5", "--resume"]) == 0
    assert "holds no EMA of the student" in capsys.readouterr().out
    # started from step 2's weights, then one update at step 3 with decay 0.5
    w3, ema = states("step-00000003"), read_ema(run / "checkpoints", "step-00000003")["module"]
    prefix = "distiller.student.model."
    for k, v in ema.items():
        if v.is_floating_point():
            ref = 0.5 * w2[prefix + k].double() + 0.5 * w3[prefix + k].double()
            torch.testing.assert_close(v.double(), ref, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(v, w3[prefix + k]), k
    assert main([*args, "--set", "train.max_steps=4", "--resume"]) == 0
    assert "holds an EMA of the student; train.ema_decay is off" in capsys.readouterr().out
    assert read_pointer(run / "checkpoints", "latest") == "step-00000004"
    assert read_ema(run / "checkpoints", "step-00000004") is None


def test_the_ema_resumes_on_another_world_size(tmp_path, write_config, torchrun, capsys):
    cfg = write_config(tmp_path)
    # ZeRO-2: DeepSpeed's universal conversion of the step folder runs beside ema.pt
    common = ["train", "--config", cfg, "--set", "train.export=false", "--set", "model.student=test_resnet",
              "--set", f"train.ema_decay={DECAY}", "--set", "deepspeed.zero_stage=2"]
    run = tmp_path / "run"
    assert main([*common, "--out", str(run), "--set", "train.stop_at_step=4"]) == 0
    saved = read_ema(run / "checkpoints", "step-00000004")
    # step 4 of 1 rank is step 2 of 2 ranks: nothing trains, and the end of the run saves what every rank loaded
    two = torchrun(2, [*common, "--out", str(run), "--resume", "--set", "train.max_steps=2"])
    assert two.returncode == 0, two.stderr[-3000:]
    loaded = read_ema(run / "checkpoints", "step-00000002")
    assert loaded["module"].keys() == saved["module"].keys()
    for k, v in saved["module"].items():  # rank 0's, after train.dist_bn averaged the two ranks' equal copies
        assert torch.equal(loaded["module"][k], v), k
    # the 2 ranks evaluated the loaded EMA: the 1-process `hcd eval --ema` of that checkpoint scores the same
    ev = _rows(run, "eval")[-1]
    assert ev["step"] == 2 and "val_top1_ema" in ev
    capsys.readouterr()
    assert main(["eval", "--config", cfg, *common[3:], "--ema",
                 "--checkpoint", str(run / "checkpoints")]) == 0
    assert f"val top-1 {ev['val_top1_ema']:.2f}%  top-5 {ev['val_top5_ema']:.2f}%" in capsys.readouterr().out


def test_every_rank_keeps_the_same_ema_under_zero2(tmp_path, write_config):
    """ZeRO-2 on 2 ranks: every checkpoint save's EMA (tests/engine/ema_ranks.py writes each rank's) is the same
    on both ranks, parameters and (after train.dist_bn) BatchNorm statistics, and it is what ema.pt holds."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hcd.engine.distributed import LAUNCHER_ENV_KEYS, free_port
    root = Path(__file__).resolve().parents[2]
    dump = tmp_path / "dump"
    dump.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_KEYS}
    env.update(PYTHONPATH=str(root), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HCD_TEST_EMA_DUMP=str(dump))
    cfg, run = write_config(tmp_path), tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(root / "tests" / "engine" / "ema_ranks.py"), "train", "--config", cfg,
                        "--out", str(run), "--set", "deepspeed.zero_stage=2", "--set", "model.student=test_resnet",
                        "--set", "train.export=false", "--set", "train.save_every_steps=1",
                        "--set", "train.max_steps=3", "--set", f"train.ema_decay={DECAY}"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    for step in (1, 2, 3):
        a, b = (torch.load(dump / f"rank{k}-step{step}.pt", weights_only=True) for k in (0, 1))
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert torch.equal(v, b[k]), (step, k)
    saved = read_ema(run / "checkpoints", "step-00000003")["module"]
    assert all(torch.equal(v, saved[k]) for k, v in a.items())


def test_a_16_bit_runs_ema_and_export_evaluate_from_their_16_bit_images(tmp_path, write_config, photo_folder,
                                                                      capsys):
    """bf16-pure: the torch loader gives bf16 images; `hcd eval --ema` and the eval of the exported student (fp32
    weights) read them as fp32, as the trainer's EMA evaluation does, and score what it logged."""
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    sets = ["--set", "model.student=test_resnet", "--set", "train.precision=bf16-pure",
            "--set", "deepspeed.zero_stage=1", "--set", f"train.ema_decay={DECAY}", "--set", "data.loader=torch",
            "--set", "data.num_workers=0", "--set", f"data.root={photo_folder(tmp_path / 'data')}",
            "--set", "model.num_classes=4"]
    assert main(["train", "--config", cfg, "--out", str(run), *sets, "--set", "train.max_steps=2"]) == 0
    last = _rows(run, "eval")[-1]
    capsys.readouterr()
    assert main(["eval", "--config", cfg, *sets, "--ema", "--checkpoint", str(run / "checkpoints")]) == 0
    assert f"val top-1 {last['val_top1_ema']:.2f}%  top-5 {last['val_top5_ema']:.2f}%" in capsys.readouterr().out
    for export in ("student_ema", "student"):
        assert main(["eval", "--config", cfg, *sets, "--checkpoint", str(run / export)]) == 0
