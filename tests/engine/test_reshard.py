"""--resume on another world size (engine/reshard.py): the data position arithmetic, a 1 -> 2 -> 1 rank round
trip through DeepSpeed's universal checkpoint (ZeRO-2, SGD with momentum) that reproduces the uninterrupted
1-process run, and the changes that stay refused."""
import json
import math

import torch

from hcd.engine.checkpoint import read_pointer
from hcd.engine.cli import main
from hcd.engine.reshard import position, restep, seed_for, unsupported

PARTS = ("ce", "kd", "sce", "skl", "ol")


def test_data_position_from_the_samples_seen():
    # 1 -> 2 ranks, batch 8: 4 batches of 8 = 32 samples = 2 batches of 16 (a boundary of both shardings)
    assert position(0, 4, 1, 2, 8, 3, 1) == {"epoch": 0, "batch": 2, "step": 2, "seen_again": 0}
    # 3 batches of 8 = 24 samples: the 2-rank run resumes at batch 1 (16 samples) and sees 8 again
    assert position(0, 3, 1, 2, 8, 3, 1) == {"epoch": 0, "batch": 1, "step": 1, "seen_again": 8}
    # 2 -> 1 in epoch 1 of 6 batches per epoch, accumulation 2: step = (1 * 6 + 4) // 2
    assert position(1, 2, 2, 1, 8, 6, 2) == {"epoch": 1, "batch": 4, "step": 5, "seen_again": 0}
    # 2 -> 3 ranks, 50 samples: 2 batches of 2 x 8 used 32; 3 ranks have 2 batches of 24 per epoch -> batch 1
    assert position(0, 2, 2, 3, 8, 2, 1)["batch"] == 1
    # 1 -> 4 ranks, 48 samples: 4 ranks use 32 per epoch (1 batch each), fewer than the 40 used: the next epoch
    assert position(0, 5, 1, 4, 8, 1, 1) == {"epoch": 1, "batch": 0, "step": 1, "seen_again": 0}
    assert seed_for(0, 0, 4) != seed_for(0, 1, 4) and seed_for(0, 1, 4) == seed_for(0, 1, 4)
    assert restep([{"step": 4}, {"kind": "x"}, {"step": 3}], 1, 2) == [{"step": 2}, {"kind": "x"}, {"step": 1.5}]


def test_what_cannot_be_converted_is_named(tmp_path):
    base = {"deepspeed.zero_stage": 2, "train.precision": "fp32", "optim.name": "sgd"}
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()  # a step folder with ZeRO partitions
    assert unsupported(base, tmp_path) == "" and unsupported(dict(base, **{"optim.name": "adamw"}), tmp_path) == ""
    assert "optim.name lamb has no universal conversion" in unsupported(dict(base, **{"optim.name": "lamb"}), tmp_path)
    assert "ZeRO 0-2 only" in unsupported(dict(base, **{"deepspeed.zero_stage": 3}), tmp_path)
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()  # ZeRO-0: the whole state, no conversion
    assert unsupported(dict(base, **{"optim.name": "lamb"}), tmp_path) == ""


def _model_states(step_folder):
    return torch.load(step_folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def test_resume_one_rank_on_two_and_back_reproduces_the_one_process_run(tmp_path, write_config, torchrun, train_rows):
    cfg = write_config(tmp_path)
    common = ["train", "--config", cfg, "--set", "deepspeed.zero_stage=2", "--set", "train.export=false",
              "--set", "model.student=test_resnet", "--set", "train.epochs=1"]  # timm's 0.4M-parameter ResNet
    full, split = tmp_path / "full", tmp_path / "split"
    assert main([*common, "--out", str(full)]) == 0  # 1 process: 6 batches of 8 per epoch, 6 steps
    assert main([*common, "--out", str(split), "--set", "train.stop_at_step=4"]) == 0
    ckpt = split / "checkpoints"
    saved = _model_states(ckpt / "step-00000004")["module"]
    # 2 processes: step 4 of 1 rank (32 samples of epoch 0) is step 2 of 2 ranks (2 batches of 2 x 8); with
    # train.max_steps=2 nothing trains, and the end of the run saves what was loaded as a 2-rank checkpoint
    two = torchrun(2, [*common, "--out", str(split), "--resume", "--set", "train.max_steps=2"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "resuming a checkpoint of 1 process(es) with 2" in two.stdout, two.stdout
    assert "epoch 0 batch 4 of 1 ranks is batch 2 of epoch 0 of 2 ranks" in two.stdout
    assert "re-seeded from (seed, rank, step)" in two.stdout and "window open at the checkpoint restarts" in two.stdout
    assert read_pointer(ckpt, "latest") == "step-00000002"
    assert json.loads((ckpt / "step-00000002" / "layout.json").read_text())["world size (processes)"] == 2
    states = _model_states(ckpt / "step-00000002")
    # the LR schedule continues at the same epoch: step 2 of this world's schedule (where it was step 4)
    assert states["lr_scheduler"]["last_epoch"] == 2 and states["global_steps"] == 2
    loaded = states["module"]
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():  # weights and BatchNorm statistics, exactly
        assert torch.equal(loaded[k], v), k
    # back on 1 process: the optimizer state (SGD momentum, through the conversion twice), the LR schedule and
    # the data position carry on, so the remaining steps are the uninterrupted run's, bit for bit
    assert main([*common, "--out", str(split), "--resume"]) == 0
    a, b = train_rows(full), train_rows(split)
    assert [r["step"] for r in b] == list(range(1, 7))  # the 2-rank interlude's rows are re-expressed in steps
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", *PARTS):
            assert ra[key] == rb[key], (ra["step"], key)
    assert all(math.isfinite(r["loss"]) for r in b)
    assert read_pointer(ckpt, "latest") == "step-00000006"


def test_resume_on_another_world_size_keeps_the_other_refusals(tmp_path, capsys, write_config):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    args = ["train", "--config", cfg, "--out", str(run), "--set", "train.max_steps=2", "--set", "train.export=false",
            "--set", "model.student=test_resnet"]
    assert main([*args, "--set", "deepspeed.zero_stage=3"]) == 0
    ckpt = run / "checkpoints"
    tag = read_pointer(ckpt, "latest")
    layout = json.loads((ckpt / tag / "layout.json").read_text())
    (ckpt / tag / "layout.json").write_text(json.dumps(dict(layout, **{"world size (processes)": 2})))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    for extra, needle in (
            (["--set", "deepspeed.zero_stage=3"],
             "--resume: world size (processes) is 1 but {} was written with 2, and it cannot be converted: "
             "hcd converts ZeRO 0-2 only"),
            (["--set", "deepspeed.zero_stage=3", "--set", "data.batch_size=4"], "--resume: data.batch_size is 4 but"),
            (["--set", "deepspeed.zero_stage=3", "--set", "train.precision=bf16"], "--resume: train.precision is bf16"),
            (["--set", "deepspeed.zero_stage=2"], "--resume: deepspeed.zero_stage is 2 but")):
        capsys.readouterr()
        assert main([*args, "--resume", *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle.format(ckpt / tag) in err, err
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_a_checkpoint_of_the_same_world_size_loads_as_before(tmp_path):
    # check_resume_layout returns None for the same world size: the ordinary resume path (its tests in
    # test_trainer.py) is taken, with the window and the RNG files of the checkpoint
    from hcd.engine.layout import check_resume_layout
    now = {"method": "hcd", "world size (processes)": 1, "deepspeed.zero_stage": 2}
    assert check_resume_layout(dict(now), now, tmp_path) is None and check_resume_layout(None, now, tmp_path) is None
    assert check_resume_layout(dict(now, **{"world size (processes)": 2, "optim.name": "sgd"}), now, tmp_path) == 2
