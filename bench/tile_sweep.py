"""Tile sweep of the fused head's launches on one GPU: which GEMM tiles and row-kernel warps are fastest.

At the headline shape (hcd.engine.bench.shapes: B=256, C=1000, n=4, Swin-T -> ResNet18's
Dp=Dt=768) as in training (the teacher feature frozen, so dX covers the Dp columns only), for bf16 and fp32
activations, every candidate of each launch is timed alone as device time (hcd.engine.bench.timing.graph_ms: 10
launches captured in a CUDA graph and replayed), and its output is checked against the default choice's (a
tile changes only the summation order). The default is marked "*", the fastest "<"; a candidate that does
not compile on this card (shared memory) shows its error.
Feeds the per-shape choices in kernels/gemm.py (_tile) and kernels/launch.py (row_num_warps); run it when
the profile of `hcd bench` shows a GEMM or the row kernel dominating:
    python bench/tile_sweep.py [--out DIR]          (CUDA only; about a minute, most of it compiling)
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (BM, BN, BK, num_warps, num_stages). 16-bit operands: the forward Z GEMM; fp32 (TF32 or IEEE) operands:
# the backward GEMMs (fp32 dZ) and everything with fp32 activations.
TILES_16 = [(64, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3),
            (64, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (32, 64, 64, 4, 3)]
TILES_32 = [(64, 64, 32, 4, 3), (32, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3),
            (128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (64, 64, 64, 4, 3), (128, 128, 32, 8, 4)]
ROW_WARPS = [2, 4, 8, 16]


def launches(dtype: torch.dtype, device) -> dict:
    """name -> (run(tile) -> output tensor, candidates, flops): the fused head's heavy launches on the
    inputs the tests and `hcd verify` use."""
    from hcd.kernels import HCDLossConfig
    from hcd.engine.bench.shapes import headline_shape
    from hcd.kernels.testing import make_inputs
    from hcd.kernels.gemm import _backward_dot, _gemm
    from hcd.kernels.hcd_head import _row_launch
    case = headline_shape()  # the teacher feature frozen, as in training
    cfg = HCDLossConfig(n_sublogits=case.n)
    inp = {k: (v.detach() if v is not None else None) for k, v in make_inputs(case, dtype, device).items()}
    x_s, x_t, w, b = inp["x_student"], inp["x_teacher"], inp["weight"], inp["bias"]
    B, Dp, N = x_s.shape[0], x_s.shape[1], w.shape[0]
    g = torch.tensor(1.0, device=device)
    dzl = torch.empty((1, B, case.C), dtype=torch.float32, device=device)
    partials = torch.empty((B, 4), dtype=torch.float32, device=device)
    bwd = _backward_dot(dtype)
    fwd_tiles = TILES_16 if dtype != torch.float32 else TILES_32
    D = w.shape[1]

    def z_gemm(tile):
        return _gemm(torch.empty((B, N), dtype=torch.float32, device=device), x_s, w[:, :Dp].t(), a2=x_t,
                     b2=w[:, Dp:].t(), bias=b, dot_dtype=dtype, tile=tile)

    def row(warps):
        out = torch.empty_like(z)
        _row_launch(z, inp["teacher_logits"], inp["student_logits"], inp["target"], out, dzl, partials, cfg,
                    teacher_grad=False, write_dz=True, num_warps=warps)
        return out

    z = z_gemm(None)  # the backward GEMMs' operands, made by the library's own choices
    dz = row(None)

    def dx_gemm(tile):
        return _gemm(torch.empty((B, Dp), dtype=dtype, device=device), dz, w[:, :Dp], scale=g, alpha=1.0 / B,
                     tile=tile, **bwd)

    def dw_gemm(tile):
        db = torch.empty((N,), dtype=b.dtype, device=device)
        return _gemm(torch.empty_like(w), dz.t(), x_s, b2=x_t, split_n=True, scale=g, alpha=1.0 / B,
                     colsum=db, tile=tile, **bwd)

    return {"z_gemm": (z_gemm, fwd_tiles, 2 * B * N * D), "dx_gemm": (dx_gemm, TILES_32, 2 * B * N * Dp),
            "dw_gemm": (dw_gemm, TILES_32, 2 * N * B * D), "row": (row, ROW_WARPS, None)}


def sweep(device) -> list:
    from hcd.engine.bench.roofline import per_second
    from hcd.engine.bench.timing import graph_ms, try_cuda
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for name, (run, candidates, flops) in launches(dtype, device).items():
            reference = run(None)
            for cand in [None] + list(candidates):
                out, err = try_cuda(lambda: run(cand))
                same = None
                if out is not None:
                    same = bool(torch.allclose(out.float(), reference.float(), rtol=2e-2, atol=1e-3 * float(
                        reference.float().abs().max())))
                us = None
                if err is None:
                    ms, err = try_cuda(lambda: graph_ms(lambda: (lambda: run(cand))))
                    us = ms * 1e3 if ms is not None else None
                rows.append({"dtype": str(dtype).replace("torch.", ""), "launch": name,
                             "candidate": "default" if cand is None else list(cand) if isinstance(cand, tuple) else cand,
                             "us": us, "tflops": per_second(flops, us * 1e-3) if us and flops else None,
                             "matches_default": same, "error": err})
    return rows


def format_rows(rows: list) -> str:
    lines = [f"{'dtype':9} {'launch':8} {'candidate':24} {'us':>8} {'TFLOP/s':>8}  note"]
    best = {}
    for r in rows:
        if r["us"] is not None and r["candidate"] != "default":
            key = (r["dtype"], r["launch"])
            best[key] = min(best.get(key, float("inf")), r["us"])
    for r in rows:
        key = (r["dtype"], r["launch"])
        note = ("*" if r["candidate"] == "default" else "") + ("<" if r["us"] is not None and r["us"] == best.get(key)
                                                              else "")
        if r["matches_default"] is False:
            note += " output differs from the default's"
        if r["error"]:
            note += " " + r["error"]
        us = "-" if r["us"] is None else f"{r['us']:.1f}"
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.1f}"
        lines.append(f"{r['dtype']:9} {r['launch']:8} {str(r['candidate']):24} {us:>8} {tf:>8}  {note}")
    lines.append("device time per launch (CUDA-graph replay); * = the library's own choice, < = fastest candidate; "
                 "candidates are (BM, BN, BK, warps, stages) for GEMMs, warps for the row kernel")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"), help="folder for tile_sweep.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tile_sweep: error: needs a CUDA device (the interpreter's timings mean nothing)", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    rows = sweep(torch.device("cuda"))
    from hcd.engine.runinfo import commit, versions, write_json
    path = Path(args.out) / "tile_sweep.json"
    write_json(path, {"device": torch.cuda.get_device_name(), "commit": commit(), "versions": versions(),
                      "rows": rows})
    print(format_rows(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
