"""train.dist_bn and train.sync_bn (engine/batchnorm.py): with 2 ranks under torchrun the BatchNorm statistics a
checkpoint holds are the mean of the ranks' (reduce), rank 0's (broadcast) or rank 0's own (none); sync_bn is
refused off CUDA in one line before anything is written."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hcd.engine.cli import main
from hcd.engine.distributed import LAUNCHER_ENV_KEYS, free_port

# Under torchrun: the trainer's own run, with distribute_bn wrapped to dump every rank's statistics before and
# after it, so the test can compare the saved file with the ranks' values.
SCRIPT = textwrap.dedent("""
    import sys, torch
    from hcd.engine import evaluate, trainer
    from hcd.engine.batchnorm import bn_buffers
    from hcd.engine.config import load_config
    cfg_path, out, mode, dump = sys.argv[1:5]
    real, calls = trainer.distribute_bn, []
    def recorded(module, m, world):
        before = [b.clone() for b in bn_buffers(module)]
        real(module, m, world)
        calls.append((before, [b.clone() for b in bn_buffers(module)]))
    trainer.distribute_bn = evaluate.distribute_bn = recorded  # the save's call and the evaluation's
    cfg = load_config(cfg_path, (f"train.dist_bn={mode}", "train.max_steps=2", "train.export=false",
                                 "deepspeed.zero_stage=2"))
    code = trainer.train(cfg, out)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ["RANK"])
    torch.save(calls, f"{dump}/rank{rank}.pt")
    sys.exit(code)
""")


def _saved_bn(run):
    states = torch.load(run / "checkpoints" / "step-00000002" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    return [v for k, v in states.items() if "running_mean" in k or "running_var" in k]


@pytest.mark.parametrize("mode", ["reduce", "broadcast", "none"])
def test_saved_statistics_follow_dist_bn_with_two_ranks(mode, tmp_path, write_config):
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    cfg = write_config(tmp_path)
    (tmp_path / "run_bn.py").write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(root), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in LAUNCHER_ENV_KEYS:
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(tmp_path / "run_bn.py"), cfg, str(tmp_path / "run"), mode, str(tmp_path)],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in (0, 1)]
    assert len(calls[0]) == len(calls[1]) == 2  # the run ends inside epoch 1: its eval, then its save
    before0, after0 = calls[0][0]  # at the eval: what the ranks' own batches made of the statistics
    before1, after1 = calls[1][0]
    assert any(not torch.equal(a, b) for a, b in zip(before0, before1))  # the ranks saw different batches
    expect = {"reduce": [(a + b) / 2 for a, b in zip(before0, before1)], "broadcast": before0, "none": before0}[mode]
    saved = _saved_bn(tmp_path / "run")
    assert len(saved) == len(expect) > 0
    for s, e, a0, a1 in zip(saved, expect, after0, after1):
        assert torch.allclose(s, e, rtol=1e-6, atol=1e-7)
        if mode != "none":  # both ranks go on (and evaluated) with the same statistics
            assert torch.equal(a0, a1)


def test_sync_bn_off_cuda_is_a_one_line_error(tmp_path, capsys, write_config):
    cfg = write_config(tmp_path)
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "run"), "--set", "train.sync_bn=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.sync_bn" in err[0] and not (tmp_path / "run").exists()
