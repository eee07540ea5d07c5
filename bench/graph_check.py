"""train.cuda_graph_loss on a GPU (bench/gpu_check.sh's step section): the same steps with and without the
captured loss, their loss values compared and their times.

    python3 bench/graph_check.py [--engine] [--json FILE]

1. loss: hcd_loss alone at the headline shape (4 stages, B=256, C=1000, n=4, Dp=Dt=768, bf16) trained by SGD
   on the CFM weights and biases, 2 micro-batches of gradient accumulation per step (the case where a
   graph's static gradient buffers would corrupt .grad, engine/loss_graph.py), from the same start:
   the fused path is deterministic (no atomics), so both ways should log the same losses.
2. --engine: the trainer's own micro-step on the DeepSpeed engine of the step rows (engine/bench/step_build.py:
   configs/imagenet/swin_tiny-resnet18.yaml, B=128, bf16, ZeRO-1; no torch.compile here, it is not what is
   compared), train.cuda_graph_loss false and true, the same seed and batch: the loss of each of the first
   steps (cuDNN may pick other convolution algorithms per build: close, not equal) and ms per step.
Writes its JSON after each part, so a run cut short keeps what it measured.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEPS, TIMED = 5, 20
LOSS_TOL = {"loss": 1e-6, "engine": 2e-2}  # max relative difference of a step's loss, graph vs plain


def max_rel_diff(a, b) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def verdict(plain, graphed, tol) -> dict:
    diff = max_rel_diff(graphed, plain)
    return {"plain": plain, "graphed": graphed, "max_rel_diff": diff, "tolerance": tol, "equal": diff <= tol}


def _loss_run(loss_fn, inputs, cfg, steps):
    """(losses of each step, ms per step over the last TIMED steps): SGD on the weights, 2 micro-batches."""
    w, b = (inputs[k].detach().clone().requires_grad_(True) for k in ("weights", "biases"))
    opt = torch.optim.SGD([w, b], lr=0.05)
    losses, t0 = [], None
    for step in range(steps):
        if step == steps - TIMED:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        total = None
        for micro in range(2):
            x_s = inputs["x_students"][micro].detach().requires_grad_(True)
            z_s = inputs["student_logits"][micro].detach().requires_grad_(True)
            # activations enter as non-leaves, as in training (a leaf is taken for a parameter, engine/loss_graph.py)
            loss, _ = loss_fn(x_s * 1, inputs["x_teacher"], w, b, inputs["teacher_logits"], z_s * 1,
                              inputs["target"], cfg)
            (loss / 2).backward()
            total = loss.detach() if total is None else total + loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / TIMED
    return [float(v) / 2 for v in losses[:STEPS]], ms


def loss_check(dev=None) -> dict:
    from hcd.engine.bench.shapes import headline_shape
    from hcd.engine.loss_graph import GraphedLoss
    from hcd.kernels import HCDLossConfig, hcd_loss
    from hcd.kernels.testing import make_loss_inputs
    shape, dev = headline_shape(), dev or torch.device("cuda")
    cfg = HCDLossConfig(n_sublogits=shape.n)
    batches = [make_loss_inputs(dataclasses.replace(shape, seed=s), 4, torch.bfloat16, dev) for s in (0, 1)]
    inputs = dict(batches[0], x_students=[b["x_students"] for b in batches],
                  student_logits=[b["student_logits"] for b in batches])
    steps = STEPS + TIMED
    plain, plain_ms = _loss_run(hcd_loss, inputs, cfg, steps)
    graphed_fn = GraphedLoss()
    graphed, graphed_ms = _loss_run(graphed_fn, inputs, cfg, steps)
    return {"what": "hcd_loss, 4 stages, B=256 C=1000 n=4 Dp=Dt=768, bf16, SGD, 2 micro-batches per step",
            **verdict(plain, graphed, LOSS_TOL["loss"]), "captures": graphed_fn.captures,
            "ms_per_step": {"plain": plain_ms, "graphed": graphed_ms}}


def engine_check() -> dict:
    from hcd.engine.bench.step_build import engine_run, micro_step_fn, release, step_config, synthetic_batch
    from hcd.engine.bench.step_rows import step_ms
    dev = torch.device("cuda")
    base = step_config(dev)
    out = {"what": "trainer._micro_step, configs/imagenet/swin_tiny-resnet18.yaml, B=128, bf16, ZeRO-1, no compile"}
    losses, times = {}, {}
    for graph in (False, True):
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, compile="none", cuda_graph_loss=graph))
        images, labels = synthetic_batch(cfg, dev)
        run = engine_run(cfg, "hcd")
        step = micro_step_fn(run, images, labels)
        values = []
        for _ in range(STEPS):
            step()
            values.append(run.window.means()["loss"])
        times[graph] = step_ms(step, dev, quick=True)
        losses[graph] = values
        release(run)
    out.update(verdict(losses[False], losses[True], LOSS_TOL["engine"]))
    out["ms_per_step"] = {"plain": times[False], "graphed": times[True]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", action="store_true", help="also the trainer step on the DeepSpeed engine")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("graph_check: CUDA graphs need a GPU; nothing to check here", file=sys.stderr)
        return 2
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    parts = [("loss", loss_check)] + ([("engine", engine_check)] if args.engine else [])
    ok = True
    for name, check in parts:
        result[name] = check()
        ok = ok and result[name]["equal"]
        r = result[name]
        print(f"{name}: {r['what']}\n  losses plain   {['%.6f' % v for v in r['plain']]}\n"
              f"  losses graphed {['%.6f' % v for v in r['graphed']]}\n  max rel diff {r['max_rel_diff']:.2e} "
              f"(tolerance {r['tolerance']:g}): {'equal' if r['equal'] else 'DIFFERENT'}; ms/step plain "
              f"{r['ms_per_step']['plain']:.3f}, graphed {r['ms_per_step']['graphed']:.3f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
