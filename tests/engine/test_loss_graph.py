"""train.cuda_graph_loss (engine/loss_graph.py) without a GPU: the switch is refused where it cannot run (CPU, ZeRO-3,
other methods) with one line naming it, and GraphedLoss's bookkeeping is checked against a CPU stand-in for
torch.cuda.make_graphed_callables that keeps its semantics: outputs and parameter gradients handed back as
views of static buffers that the next replay overwrites. The capture itself needs CUDA: bench/graph_check.py
(run by bench/gpu_check.sh) compares captured and uncaptured training steps there."""
import pytest
import torch

from hcd.engine.config import load_config
from hcd.engine.config_tree import ConfigError
from hcd.engine.loss_graph import GraphedLoss, _OwnGrad
from hcd.kernels import HCDLossConfig, hcd_loss
from hcd.kernels.testing import Case, make_loss_inputs

ARGS = ("x_students", "x_teacher", "weights", "biases", "teacher_logits", "student_logits", "target")


def static_buffer_capture(fn, sample_args):
    """make_graphed_callables's contract on CPU: the call runs on the static sample inputs (a user input at
    another address is copied in first), outputs come back as views of static buffers, and the backward
    returns the gradients as views of static buffers that the next call overwrites."""
    diff = [i for i, t in enumerate(sample_args) if t.requires_grad]
    out_bufs, grad_bufs = [None, None], [torch.zeros_like(sample_args[i]) for i in diff]

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            for static, t in zip(sample_args, inputs):
                if static.data_ptr() != t.data_ptr():
                    static.detach().copy_(t)
            with torch.enable_grad():
                ctx.total, vec = fn(*sample_args)
            for k, v in enumerate((ctx.total.detach(), vec.detach())):
                out_bufs[k] = v.clone() if out_bufs[k] is None else out_bufs[k].copy_(v)
            ctx.mark_non_differentiable(out_bufs[1])
            return out_bufs[0].detach(), out_bufs[1].detach()

        @staticmethod
        def backward(ctx, g, _):
            grads = torch.autograd.grad(ctx.total, [sample_args[i] for i in diff], g)
            for buf, grad in zip(grad_bufs, grads):
                buf.copy_(grad)
            out = [None] * len(sample_args)
            for i, buf in zip(diff, grad_bufs):
                out[i] = buf.detach()
            return tuple(out)
    return lambda *args: Replay.apply(*args)


def _inputs(seed):
    t = make_loss_inputs(Case(6, 5, 2, 8, 4, seed=seed), 2, torch.float32)
    return {k: (v.detach() if k not in ("weights", "biases") and isinstance(v, torch.Tensor) else v)
            for k, v in t.items()}


def _accumulate(loss_fn, params, cfg, batches):
    """Two micro-batches of gradient accumulation into the weights' .grad, as a training step does."""
    totals = []
    for inp in batches:
        x_s = inp["x_students"].clone().requires_grad_(True)  # an activation: not a leaf of the model
        total, parts = loss_fn(x_s * 1.0, inp["x_teacher"], *params, inp["teacher_logits"],
                               inp["student_logits"], inp["target"], cfg, backend="eager", stages=(3, 4))
        total.backward()
        totals.append((total.item(), {k: v.item() for k, v in parts.items()}))
    return totals, [p.grad.clone() for p in params]


def test_graphed_loss_accumulates_like_the_plain_call():
    cfg = HCDLossConfig(n_sublogits=2)
    batches = [_inputs(0), _inputs(1)]
    ref_params = [batches[0][k].detach().clone().requires_grad_(True) for k in ("weights", "biases")]
    want = _accumulate(hcd_loss, ref_params, cfg, batches)
    params = [p.detach().clone().requires_grad_(True) for p in ref_params]
    graphed = GraphedLoss(capture=static_buffer_capture)
    got = _accumulate(graphed, params, cfg, batches)
    assert graphed.captures == 1  # one signature, captured once, replayed for the second batch
    for (t_got, p_got), (t_want, p_want) in zip(got[0], want[0]):
        assert t_got == pytest.approx(t_want, rel=1e-6) and set(p_got) == set(p_want) == {
            "ce", "kd", "sce", "skl", "ol", "sce3", "sce4", "skl3", "skl4", "ol3", "ol4"}
        assert all(p_got[k] == pytest.approx(p_want[k], rel=1e-6, abs=1e-7) for k in p_want)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_without_own_grads_the_replay_would_corrupt_accumulation(monkeypatch):
    """The stand-in reproduces pytorch#181723: with _OwnGrad bypassed the first micro-batch's weight gradient is
    overwritten by the second replay, so the test above would see it."""
    monkeypatch.setattr(_OwnGrad, "apply", staticmethod(lambda t: t))
    cfg = HCDLossConfig(n_sublogits=2)
    batches = [_inputs(0), _inputs(1)]
    ref_params = [batches[0][k].detach().clone().requires_grad_(True) for k in ("weights", "biases")]
    want = _accumulate(hcd_loss, ref_params, cfg, batches)[1]
    params = [p.detach().clone().requires_grad_(True) for p in ref_params]
    got = _accumulate(GraphedLoss(capture=static_buffer_capture), params, cfg, batches)[1]
    assert not torch.allclose(got[0], want[0], rtol=1e-3)


def test_signatures_budget_moved_weights_and_no_grad():
    cfg = HCDLossConfig(n_sublogits=2)
    calls = []

    def capture(fn, sample):
        calls.append([tuple(t.shape) for t in sample])
        return static_buffer_capture(fn, sample)
    graphed = GraphedLoss(capture=capture, max_captures=2)
    inp = _inputs(0)
    params = [inp[k].detach().clone().requires_grad_(True) for k in ("weights", "biases")]

    def call(batch=6, weights=None):
        t = make_loss_inputs(Case(batch, 5, 2, 8, 4), 2, torch.float32)
        return graphed(t["x_students"].detach(), t["x_teacher"], weights if weights is not None else params[0],
                       params[1], t["teacher_logits"], t["student_logits"].detach(), t["target"], cfg,
                       backend="eager")
    call(), call()
    assert len(calls) == 1
    call(batch=4)  # a partial last batch: a second signature
    assert len(calls) == 2
    moved = params[0].detach().clone().requires_grad_(True)
    total, parts = call(weights=moved)  # a weight at a new address: the budget is spent, so the plain call
    assert len(calls) == 2 and total.grad_fn is not None and set(parts) >= {"ce", "sce1", "ol2"}
    with torch.no_grad():
        call(batch=3)  # nothing to capture for a call without autograd
    assert len(calls) == 2


def test_refused_where_it_cannot_run(write_config, tmp_path, capsys):
    cfg = load_config(write_config(tmp_path), ("train.cuda_graph_loss=true",))
    assert cfg.train.cuda_graph_loss is True and load_config().train.cuda_graph_loss is False
    with pytest.raises(ConfigError, match=r"^train.cuda_graph_loss: with deepspeed.zero_stage 3"):
        load_config(write_config(tmp_path), ("train.cuda_graph_loss=true", "deepspeed.zero_stage=3"))
    with pytest.raises(ConfigError, match=r"^train.cuda_graph_loss: captures the HCD loss call"):
        load_config(write_config(tmp_path), ("train.cuda_graph_loss=true", "method=kd"))
    from hcd.engine.loss_graph import graphed_loss
    with pytest.raises(ConfigError, match="^train.cuda_graph_loss: .*no hcd_loss call"):
        graphed_loss(torch.nn.Module(), torch.device("cuda"))
    # on CPU: `hcd train` stops at build time, exit 2, one line naming the field
    from hcd.engine.cli import main
    assert main(["train", "--config", write_config(tmp_path), "--out", str(tmp_path / "run"),
                 "--set", "train.cuda_graph_loss=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hcd train: error: train.cuda_graph_loss: CUDA graphs need a CUDA device")
    assert "\n" not in err[-1] and not (tmp_path / "run").exists()
