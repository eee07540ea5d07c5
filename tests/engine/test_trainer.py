"""The DeepSpeed trainer on CPU: 1-process runs in this process (hcd.engine.cli.main), 2-process runs through
torchrun; resume equivalence, non-finite steps, signals, evaluation and the run folder's contents."""
import json
import math
import os
import signal

import pytest

from hcd.engine.cli import main
from hcd.engine.checkpoint import read_pointer

PARTS = ("ce", "kd", "sce", "skl", "ol", "sce3", "skl3", "ol3", "sce4", "skl4", "ol4")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, write_config):
    """One 1-process ZeRO-0 run shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("base")
    cfg = write_config(tmp)
    run = tmp / "run"
    assert main(["train", "--config", cfg, "--out", str(run)]) == 0
    return cfg, run


def test_one_process_run_writes_the_run_folder(base_run):
    _, run = base_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "teacher" and kinds.count("eval") == 2 and kinds.count("train") == 12  # 6 steps x 2 epochs
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in train:
        for key in ("loss", "lr", "images_per_s", "epoch", *PARTS):
            assert math.isfinite(r[key]), key
    # the logged loss is the spec's weighted total of the logged parts (lambda = 1 here, beta = omega = gamma = 1)
    r = train[0]
    assert r["loss"] == pytest.approx(r["ce"] + r["sce"] + r["kd"] + r["skl"] + r["ol"], rel=1e-5)
    # timm's cosine per optimizer step (schedule.update: step): warm-up from warmup_lr 1e-4 over half an epoch
    # (3 steps), then the cosine over all 12 steps of train.epochs at t = step (no warm-up prefix), towards min_lr
    lr, w, lo = 0.02, 1e-4, 1e-6
    expect = [w + s * (lr - w) / 3 if s < 3 else lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * s / 12))
              for s in range(12)]
    assert [r["lr"] for r in train] == pytest.approx(expect, rel=1e-9)
    ev = [r for r in rows if r["kind"] == "eval"]
    assert [e["epoch"] for e in ev] == [1, 2] and all(0 <= e["val_top1"] <= e["val_top5"] <= 100 for e in ev)
    ckpt = run / "checkpoints"
    assert read_pointer(ckpt, "latest") == "step-00000012" and read_pointer(ckpt, "best") is not None
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp")]
    for name in ("config.yaml", "curves.png", "student.safetensors", "student.json", "student/config.json",
                 "student/model.safetensors"):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir())


def test_eval_of_checkpoint_and_export_match_the_last_eval_row(base_run, capsys):
    cfg, run = base_run
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    capsys.readouterr()
    assert main(["eval", "--config", cfg, "--checkpoint", str(run / "checkpoints" / "step-00000012")]) == 0
    assert main(["eval", "--config", cfg, "--checkpoint", str(run / "student.safetensors")]) == 0
    out = capsys.readouterr().out
    expect = f"val top-1 {last['val_top1']:.2f}%  top-5 {last['val_top5']:.2f}%"
    assert out.count(expect) == 2, out
    # the teacher's accuracy printed beside the student's comes from a random teacher here: say so
    assert "warning: model.teacher_checkpoint is not set" in out


def test_zero2_accumulation_adamw_step_schedule_clipping(tmp_path, write_config, train_rows):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    code = main(["train", "--config", cfg, "--out", str(run), "--set", "deepspeed.zero_stage=2",
                 "--set", "train.grad_accum=2", "--set", "optim.name=adamw", "--set", "optim.lr=0.001",
                 "--set", "schedule.name=step", "--set", "schedule.step_epochs=1", "--set", "schedule.warmup_epochs=1",
                 "--set", "schedule.warmup_lr=1.0e-5", "--set", "schedule.update=epoch",
                 "--set", "train.grad_clip=1.0", "--set", "train.epochs=2", "--set", "train.export=false"])
    assert code == 0
    rows = train_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # 6 batches per epoch / accumulation 2
    # per epoch (OFA-KD's timm mode): epoch 0 at warmup_lr (the 1-epoch warm-up's t = 0), epoch 1 past the warm-up
    # and already decayed once (step_epochs counts from the start of training, as timm's warmup_prefix=False)
    assert [r["lr"] for r in rows] == pytest.approx([1e-5] * 3 + [1e-4] * 3, rel=1e-9)
    assert not (run / "student.safetensors").exists()


def test_two_processes_zero0(tmp_path, write_config, torchrun, train_rows):
    cfg = write_config(tmp_path)
    r = torchrun(2, ["train", "--config", cfg, "--out", str(tmp_path / "run"), "--set", "train.max_steps=4"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = train_rows(tmp_path / "run")
    assert [x["step"] for x in rows] == [1, 2, 3, 4] and rows[0]["images_per_s"] > 0
    assert "teacher vit_tiny_patch16_224: val top-1" in r.stdout
    assert "built successfully" not in r.stdout  # DeepSpeed's build note, once per process, is filtered


def test_zero3_two_ranks_with_uneven_val_shards_does_not_hang(tmp_path, write_config, torchrun):
    # 9 val samples, batch 4: rank 0 gets 5 (2 batches), rank 1 gets 4 (1 batch). Under ZeRO-3 each forward
    # gathers parameters collectively, so the short rank must keep step; the accuracy counts all 9 once.
    cfg = write_config(tmp_path)
    r = torchrun(2, ["train", "--config", cfg, "--out", str(tmp_path / "run"), "--set", "deepspeed.zero_stage=3",
                     "--set", "data.synthetic_val_size=9", "--set", "data.val_batch_size=4",
                     "--set", "train.max_steps=2", "--set", "train.export=false"], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    # DeepSpeed's notes about choices the engine makes on purpose are filtered: nothing a user could act on
    assert "untested optimizer" not in r.stdout + r.stderr and "DistillOutput" not in r.stdout + r.stderr
    assert "FutureWarning" not in r.stderr
    import json
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert evals and all(e["val_samples"] == 9 for e in evals)  # every val sample counted once across ranks


def test_resume_reproduces_the_uninterrupted_run_two_ranks_zero2(tmp_path, write_config, torchrun, train_rows):
    cfg = write_config(tmp_path)
    common = ["--config", cfg, "--set", "deepspeed.zero_stage=2"]
    full = torchrun(2, ["train", *common, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    # stop after step 4 (inside epoch 2: 3 steps per epoch on 2 ranks), then continue with --resume
    part = torchrun(2, ["train", *common, "--out", str(tmp_path / "split"), "--set", "train.stop_at_step=4"])
    assert part.returncode == 0, part.stderr[-3000:]
    assert read_pointer(tmp_path / "split" / "checkpoints", "latest") == "step-00000004"
    assert [r["step"] for r in train_rows(tmp_path / "split")] == [1, 2, 3, 4]
    rest = torchrun(2, ["train", *common, "--out", str(tmp_path / "split"), "--resume"])
    assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = train_rows(tmp_path / "full"), train_rows(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):  # same losses, parts and LR, bit for bit
        for key in ("loss", "lr", *PARTS):
            assert ra[key] == rb[key], (ra["step"], key)


def test_resume_without_checkpoint_is_a_one_line_error(tmp_path, capsys, write_config):
    cfg = write_config(tmp_path)
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume: no checkpoint" in err
    assert not (tmp_path / "none").exists()


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch, write_config, train_rows):
    from hcd.engine.distributed import EngineModule
    seen = []  # (call index, checksum of the student's weights when the forward ran)
    real = EngineModule.forward

    def forward(self, images, target, f_t, z_t):
        loss, logits, parts = real(self, images, target, f_t, z_t)
        seen.append(sum(p.detach().double().sum().item() for p in self.student.parameters()))
        if len(seen) in (2, 3):
            loss = loss * float("nan")
        return loss, logits, parts

    monkeypatch.setattr(EngineModule, "forward", forward)
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", cfg, "--out", str(run), "--set", "train.epochs=1",
                 "--set", "train.max_nonfinite=3", "--set", "train.export=false"]) == 0
    rows = train_rows(run)
    # steps 2 and 3 are applied with zero effect on the device (the fused optimizer's found_inf): they count
    # as steps, their rows have no finite loss to average, and the counter says how many were skipped
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["nonfinite"] for r in rows] == [0, 1, 2, 2, 2, 2]
    assert [math.isfinite(r["loss"]) for r in rows] == [True, False, False, True, True, True]
    assert seen[1] == seen[2] == seen[3] != seen[4]  # no weight moved, momentum included (SGD, momentum 0.9)


def test_too_many_non_finite_in_a_row_abort_without_checkpoint(tmp_path, monkeypatch, capsys, write_config):
    from hcd.engine.distributed import EngineModule
    real = EngineModule.forward
    monkeypatch.setattr(EngineModule, "forward",
                        lambda self, *a: (lambda o: (o[0] * float("inf"), o[1], o[2]))(real(self, *a)))
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", cfg, "--out", str(run), "--set", "train.max_nonfinite=2"]) == 1
    err = capsys.readouterr().err
    assert "2 non-finite losses in a row" in err and "train.max_nonfinite" in err
    assert not (run / "checkpoints").exists()


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tmp_path, monkeypatch, capsys, write_config, train_rows):
    from hcd.engine.distributed import EngineModule
    real = EngineModule.forward
    calls = []

    def forward(self, *a):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # pre-emption in the middle of step 3
        return real(self, *a)

    monkeypatch.setattr(EngineModule, "forward", forward)
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    args = ["train", "--config", cfg, "--out", str(run), "--set", "train.export=false", "--set", "train.log_every=2"]
    assert main(args) == 3  # a clean stop with a checkpoint: its own exit code (README, Command line)
    assert "stopped by SIGTERM at step 3" in capsys.readouterr().out
    assert [r["step"] for r in train_rows(run)] == [2, 3]  # the stop logs step 3, between two log_every rows
    assert read_pointer(run / "checkpoints", "latest") == "step-00000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(EngineModule, "forward", real)
    assert main([*args, "--resume"]) == 0
    # the stop's row (marked partial) gives way to the row the uninterrupted run logs at step 4
    assert [r["step"] for r in train_rows(run)] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("stage,precision", [(3, "fp32"), (1, "bf16-pure"), (3, "bf16")])
def test_zero3_and_bf16_exports_and_checkpoint_evals_agree(tmp_path, capsys, stage, precision, write_config):
    import torch
    from safetensors.torch import load_file
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    sets = ["--set", f"deepspeed.zero_stage={stage}", "--set", f"train.precision={precision}"]
    assert main(["train", "--config", cfg, "--out", str(run), *sets, "--set", "train.max_steps=3"]) == 0
    ev = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]
    step = read_pointer(run / "checkpoints", "latest")
    capsys.readouterr()
    if stage == 3:  # a ZeRO-3 checkpoint evaluated with another config: a one-line error, not DeepSpeed's assert
        assert main(["eval", "--config", cfg, "--checkpoint", str(run / "checkpoints" / step)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--checkpoint: deepspeed.zero_stage is 0 but" in err, err
    # the exported student (ZeRO-3: gathered from the partitions) scores what the trainer measured (bf16: with
    # the run's precision, so under the same autocast)
    autocast = sets[2:] if precision == "bf16" else []
    assert main(["eval", "--config", cfg, *autocast, "--checkpoint", str(run / "student.safetensors")]) == 0
    out = capsys.readouterr().out
    # `hcd eval` of the checkpoint folder (with the run's config) scores the same and exports the same weights
    assert main(["eval", "--config", cfg, *sets, "--checkpoint", str(run / "checkpoints" / step)]) == 0
    assert f"val top-1 {ev['val_top1']:.2f}%" in capsys.readouterr().out
    again = load_file(str(run / "checkpoints" / step / "student.safetensors"))
    exported = load_file(str(run / "student.safetensors"))
    assert set(again) == set(exported) and all(torch.equal(again[k], exported[k]) for k in exported)
    if precision != "bf16-pure":
        assert f"val top-1 {ev['val_top1']:.2f}%" in out, out
        return
    # the trainer evaluated the bf16 copies of the weights; the export holds the fp32 masters, whose bf16
    # rounding is exactly those copies: evaluated in bf16, the export scores what the trainer logged
    from hcd.engine.config import load_config
    from hcd.engine.data import build_run_loaders
    from hcd.engine.distributed import process_env
    from hcd.engine.evaluate import evaluate
    from hcd.engine.export import load_exported
    from hcd.engine.models import norm_stats
    model = load_exported(run / "student.safetensors").to(torch.bfloat16).eval()
    _, val_loader = build_run_loaders(load_config(cfg), *norm_stats(model), process_env())
    top1, top5, _ = evaluate(lambda x: model(x.to(torch.bfloat16)), val_loader, torch.device("cpu"))
    assert (top1, top5) == (ev["val_top1"], ev["val_top5"])
    # the export holds the fp32 master weights, not the bf16 copies: after 3 SGD steps most values are off
    # the bf16 grid
    w = exported["conv1.weight"]
    assert w.dtype == torch.float32 and (w != w.to(torch.bfloat16).float()).float().mean() > 0.5


def test_deepspeed_launcher_two_processes(tmp_path, write_config, train_rows):
    """`deepspeed --module hcd.engine.cli train ...`: the launcher inserts --local_rank=N before the subcommand."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    exe = shutil.which("deepspeed")
    if exe is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    root = Path(__file__).resolve().parents[2]
    from hcd.engine.distributed import LAUNCHER_ENV_KEYS, free_port
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_KEYS}
    env.update(PYTHONPATH=str(root), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    port = free_port()
    cfg = write_config(tmp_path)
    r = subprocess.run([sys.executable, exe, "--num_gpus", "2", "--master_port", str(port), "--module", "hcd.engine.cli",
                        "train", "--config", cfg, "--out", str(tmp_path / "run"), "--set", "train.max_steps=2",
                        "--set", "train.export=false"], cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [x["step"] for x in train_rows(tmp_path / "run")] == [1, 2]


def test_a_stale_checkpoint_folder_of_the_same_step_is_replaced(tmp_path, write_config):
    # A crash between a step folder's rename and its pointer update leaves step-N behind (`latest` still names
    # the previous save); the resumed run that reaches step N again must write its own weights there, not
    # point `latest` at the crashed run's folder.
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    args = ["train", "--config", cfg, "--out", str(run), "--set", "train.export=false"]
    assert main([*args, "--set", "train.max_steps=3"]) == 0
    assert read_pointer(run / "checkpoints", "latest") == "step-00000003"
    stale = run / "checkpoints" / "step-00000006"
    stale.mkdir(parents=True)
    (stale / "left_by_a_crash.txt").write_text("other weights")
    assert main([*args, "--set", "train.max_steps=6", "--resume"]) == 0
    assert read_pointer(run / "checkpoints", "latest") == "step-00000006"
    assert not (stale / "left_by_a_crash.txt").exists()
    assert list(stale.rglob("*model_states.pt")) and (stale / "rng_rank0.pt").is_file()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_resume_with_another_layout_is_a_one_line_error_that_touches_nothing(tmp_path, capsys, write_config):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    args = ["train", "--config", cfg, "--out", str(run), "--set", "train.max_steps=2", "--set", "train.export=false"]
    assert main(args) == 0
    ckpt = run / "checkpoints"
    tag = read_pointer(ckpt, "latest")
    layout = json.loads((ckpt / tag / "layout.json").read_text())
    shapes = layout.pop("parameters")
    assert layout == {"method": "hcd", "world size (processes)": 1, "data.batch_size": 8, "train.grad_accum": 1,
                      "deepspeed.zero_stage": 0, "train.precision": "fp32", "optim.name": "sgd", "weights": "fp32"}
    assert shapes["cfm_weight"] == [2, 4 * 5, 512 + 48]  # S x n*C x (Dp + Dt): ResNet18 512, tiny ViT 48
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    for command, needle in (
            ([*args, "--resume", "--set", "train.grad_accum=2"], "--resume: train.grad_accum is 2 but"),
            # another model (here: n = 2 sub-logits) is refused before DeepSpeed reads anything
            ([*args, "--resume", "--set", "loss.n_sublogits=2"],
             "--resume: this config builds another model than"),
            # a fresh run into the folder would replace its checkpoints
            (args, "already holds a run with checkpoints; pass --resume"),
            (["eval", "--config", cfg, "--checkpoint", str(ckpt), "--set", "loss.n_sublogits=2"],
             "--checkpoint: this config builds another model than")):
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, err
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # config.yaml too
    assert "cfm_weight is (2, 10, 560) here, (2, 20, 560) in the checkpoint" in err
    # a checkpoint written before layout.json kept the shapes: recovered from DeepSpeed's model-states file
    (ckpt / tag / "layout.json").write_text(json.dumps(layout))
    for command in ([*args, "--resume", "--set", "loss.n_sublogits=2"],
                    ["eval", "--config", cfg, "--checkpoint", str(ckpt), "--set", "loss.n_sublogits=2"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "cfm_weight is (2, 10, 560) here, (2, 20, 560) in the checkpoint" in err, err
    # a lost `latest` pointer: resume says which step folders exist; a fresh run still refuses the folder
    (ckpt / "latest").unlink()
    assert main([*args, "--resume"]) == 2
    assert f"write one of them into {ckpt / 'latest'} (e.g. {tag})" in capsys.readouterr().err
    assert main(args) == 2
    assert "already holds a run with checkpoints" in capsys.readouterr().err
    assert (ckpt / tag).is_dir()


def test_a_run_that_saved_no_checkpoint_says_how_to_start_again(tmp_path, capsys, write_config):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "teacher", "step": 0}) + "\n")
    for extra in ([], ["--resume"]):
        assert main(["train", "--config", cfg, "--out", str(run), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"remove {run / 'metrics.jsonl'}" in err, err
    (tmp_path / "file").write_text("x")
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "file")]) == 2
    assert "--out: " in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


def test_layout_check_names_the_world_size_and_accepts_old_checkpoints(tmp_path):
    from hcd.engine.config import ConfigError
    from hcd.engine.layout import check_layout
    now = {"world size (processes)": 2, "data.batch_size": 16}
    check_layout(None, now, tmp_path)  # written before layouts were kept: resumed as before
    check_layout(dict(now), now, tmp_path)
    with pytest.raises(ConfigError, match=r"world size \(processes\) is 2 but .* written with 4"):
        check_layout({"world size (processes)": 4, "data.batch_size": 16}, now, tmp_path)


def test_accumulation_that_does_not_divide_the_epoch_still_trains_every_epoch(tmp_path, write_config, train_rows):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    # 6 batches per epoch, windows of 4: epoch 1 ends inside the second window, which finishes in epoch 2
    assert main(["train", "--config", cfg, "--out", str(run), "--set", "train.grad_accum=4",
                 "--set", "train.export=false"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]  # 12 batches / 4
    assert [(r["epoch"], r["step"]) for r in rows if r["kind"] == "eval"] == [(1, 2), (2, 3)]


def test_a_last_step_inside_an_epoch_is_evaluated_as_a_fractional_epoch(tmp_path, write_config):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    # windows of 5 over 2 x 6 batches: 2 steps; the second ends at batch 4 of epoch 2 (10 of 12 batches used)
    assert main(["train", "--config", cfg, "--out", str(run), "--set", "train.grad_accum=5",
                 "--set", "train.export=false"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows if r["kind"] == "eval"] == [(pytest.approx(1 + 4 / 6, abs=1e-4), 2)]


def test_periodic_checkpoints_bound_what_a_hard_crash_loses(tmp_path, monkeypatch, write_config, train_rows):
    from hcd.engine import checkpoint
    from hcd.engine.distributed import EngineModule
    saved = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: saved.append((a[2], k.get("written"))) or real_save(*a, **k))
    real = EngineModule.forward
    calls = []

    def forward(self, *a):
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("simulated hard crash (no signal, no checkpoint of its own)")
        return real(self, *a)

    monkeypatch.setattr(EngineModule, "forward", forward)
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    args = ["train", "--config", cfg, "--out", str(run), "--set", "train.export=false",
            "--set", "train.save_every_steps=4"]
    with pytest.raises(RuntimeError, match="simulated hard crash"):
        main(args)
    # 6 steps per epoch: periodic saves at 4 and 8, the epoch end at 6; the crash came in step 10
    assert [s for s, written in saved if not written] == [4, 6, 8]
    assert read_pointer(run / "checkpoints", "latest") == "step-00000008"
    monkeypatch.setattr(EngineModule, "forward", real)
    saved.clear()
    assert main([*args, "--resume"]) == 0
    assert [r["step"] for r in train_rows(run)] == list(range(1, 13))
    assert [s for s, written in saved if not written] == [12]  # 12 is an epoch end: saved once, not twice


class _Clock:
    """A fake MetricWindow clock: one unit per micro-batch forward, 100 per evaluation, 50 per checkpoint."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def install(self, monkeypatch):
        from hcd.engine import checkpoint, metrics, trainer
        from hcd.engine.distributed import EngineModule
        monkeypatch.setattr(metrics.MetricWindow, "clock", staticmethod(self))
        for owner, name, cost in ((EngineModule, "forward", 1.0), (trainer, "evaluate", 100.0),
                                  (checkpoint, "save", 50.0)):
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._costing(real, cost))

    def _costing(self, real, cost):
        def timed(*args, **kwargs):
            self.now += cost
            return real(*args, **kwargs)
        return timed


def test_metrics_rows_count_training_time_only_and_resume_rewrites_them_exactly(tmp_path, monkeypatch,
                                                                                 write_config, train_rows):
    # log_every 4 over 6 steps per epoch: the row at step 8 spans the epoch end (evaluation + checkpoint);
    # the split run stops at step 5, inside a window, and its resume must log the uninterrupted run's rows
    _Clock().install(monkeypatch)
    cfg = write_config(tmp_path)
    args = ["train", "--config", cfg, "--set", "train.log_every=4", "--set", "train.export=false"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    full = train_rows(tmp_path / "full")
    assert [r["step"] for r in full] == [4, 8, 12]
    assert [r["images_per_s"] for r in full] == [8.0] * 3  # 8 images per unit of training time
    split = tmp_path / "split"
    assert main([*args, "--out", str(split), "--set", "train.stop_at_step=5"]) == 0
    assert [(r["step"], r.get("partial")) for r in train_rows(split)] == [(4, None), (5, True)]
    assert main([*args, "--out", str(split), "--resume"]) == 0
    assert train_rows(split) == full


def test_a_runs_config_trains_again_from_another_directory(tmp_path, monkeypatch, capsys, write_config):
    """README's Configs example: `hcd train --config RUN/config.yaml --out NEW --set ...` after a run whose
    paths were relative to its working directory: the new run finds the same teacher checkpoint."""
    from hcd.engine.config import load_config
    from hcd.engine.export import save_safetensors
    from hcd.engine.models import build_teacher
    cfg = load_config(write_config(tmp_path))
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    teacher = build_teacher(cfg.model.teacher, cfg.model.num_classes, kwargs=cfg.model.teacher_kwargs)
    save_safetensors({k: v.contiguous() for k, v in teacher.model.state_dict().items()}, work / "teacher.safetensors")
    monkeypatch.chdir(work)
    common = ["--set", "train.max_steps=1", "--set", "train.export=false"]
    assert main(["train", "--config", write_config(tmp_path), "--out", "runs/a", *common,
                 "--set", "model.teacher_checkpoint=teacher.safetensors"]) == 0
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--config", str(work / "runs" / "a" / "config.yaml"), "--out", str(tmp_path / "b"),
                 *common, "--set", "loss.sublogit_kl_weight=6"]) == 0
    out = capsys.readouterr().out
    assert "randomly initialised" not in out and "teacher vit_tiny_patch16_224: val top-1" in out
    assert load_config(str(tmp_path / "b" / "config.yaml")).model.teacher_checkpoint == str(work / "teacher.safetensors")


def test_training_steps_wait_for_the_device_only_to_log(tmp_path, monkeypatch, write_config, train_rows):
    """Host syncs (.item(), .tolist(), .cpu(), bool(tensor)) over a 4-step run, log_every 2: none in any
    micro-batch (forward, backward, optimizer step, non-finite check) and none at a step without a log row."""
    import torch

    from hcd.engine import trainer
    calls = []
    for name in ("item", "tolist", "cpu", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            calls.append(_name) or _real(self, *a, **k))
    per_step, micro = [], []
    real_micro, real_done = trainer._micro_step, trainer._optimizer_step_done

    def counted_micro(run, *args):
        before = len(calls)
        real_micro(run, *args)
        micro.append(len(calls) - before)

    def counted_done(run, stop):
        before = len(calls)
        reason = real_done(run, stop)
        per_step.append((run.state.step, len(calls) - before))
        return reason

    monkeypatch.setattr(trainer, "_micro_step", counted_micro)
    monkeypatch.setattr(trainer, "_optimizer_step_done", counted_done)
    cfg = write_config(tmp_path)
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "run"), "--set", "train.max_steps=4",
                 "--set", "train.log_every=2", "--set", "train.export=false"]) == 0
    assert micro == [0, 0, 0, 0]
    assert [s for s, _ in per_step] == [1, 2, 3, 4] and [n for s, n in per_step if s % 2] == [0, 0]
    assert all(n <= 2 for _, n in per_step)  # a log row: the metrics' and the non-finite counters' reads
    assert [r["step"] for r in train_rows(tmp_path / "run")] == [2, 4]
