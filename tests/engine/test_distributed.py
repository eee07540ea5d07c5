"""The DeepSpeed engine as the trainer builds it (hcd.engine.distributed.build_engine), one process on CPU.

ZeRO-3 computes the same gradients as ZeRO-0: the CFMs' output Linears reach the fused loss as tensors, not
through their modules' forward, so only their registration as external parameters lets ZeRO-3 gather them for
forward and backward. A persistence threshold of 0 partitions every parameter (the tiny config's 20x560
weights would otherwise stay whole, as the demo's do, and the external path would go untested). Whole
ZeRO-3 runs may still depart from ZeRO-0 after a few steps: summation order differs (about 6e-7 relative at
step 2 in a measured demo run) and an unstable run amplifies it, as a 1e-7 nudge of ZeRO-0's weights does."""
import json

import pytest
import torch


def _two_steps(config, stage, tmp_path):
    from deepspeed.utils import safe_get_full_grad

    from hcd.engine.config import load_config
    from hcd.engine.distiller import build_distiller
    from hcd.engine.distributed import build_engine, process_env
    sets = [f"deepspeed.zero_stage={stage}"]
    if stage == 3:
        ds = tmp_path / "zero3.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
        sets.append(f"deepspeed.config_file={ds}")
    cfg = load_config(config, tuple(sets))
    d = process_env()
    teacher, distiller, _, _ = build_distiller(cfg, d.device)
    engine = build_engine(cfg, distiller, d)
    if stage == 3:  # every parameter is partitioned: outside forward the module holds empty tensors
        assert all(p.data.numel() == 0 for p in engine.module.parameters())
    g = torch.Generator().manual_seed(0)
    B, C, S = cfg.data.batch_size, cfg.model.num_classes, cfg.data.img_size
    losses, grads = [], []
    engine.train()
    for _ in range(2):
        x, y = torch.randn(B, 3, S, S, generator=g), torch.randint(0, C, (B,), generator=g)
        f_t, z_t = teacher(x)
        loss, _, _ = engine(x, y, f_t, z_t)
        engine.backward(loss)
        grads.append({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        losses.append(loss.item())
        engine.step()
    return losses, grads


def test_zero3_gradients_match_zero0_including_the_cfm_output_layers(tiny_config, tmp_path):
    loss0, grads0 = _two_steps(tiny_config, 0, tmp_path)
    loss3, grads3 = _two_steps(tiny_config, 3, tmp_path)
    assert any(".out." in n for n in grads0[0]) and grads0[0].keys() == grads3[0].keys()
    for step in range(2):  # step 2 checks that step 1 updated every parameter (the CFM outputs too) alike
        assert loss3[step] == pytest.approx(loss0[step], rel=1e-6, abs=0)
        for n, g0 in grads0[step].items():
            g3 = grads3[step][n]
            assert g3.shape == g0.shape, n
            # relative to the tensor's largest entry; zero stays zero (timm zero-initialises the last BN of
            # each residual block, which leaves the block's other parameters without gradient at step 1)
            assert (g3 - g0).abs().max().item() <= 1e-5 * g0.abs().max().item(), (step + 1, n)
