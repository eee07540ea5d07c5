"""Compile the kernel configurations for sm_90 without a GPU (Triton frontend, LLVM and ptxas).

The interpreter runs the kernels as Python and accepts code the GPU compiler rejects (e.g. a plain-float
global read inside @triton.jit). This catches that class of error on CPU-only machines. It runs in a
child process because the kernels must be imported without TRITON_INTERPRET; skipped where the Triton
build has no NVIDIA backend.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOATS = {"alpha_s", "alpha_t", "eps", "inv_T", "T", "theta", "w_ce", "w_kl", "w_ol", "w_kd", "ce_weight",
          "kl_weight", "ol_weight", "inv_bn", "inv_b_pairs", "inv_B", "alpha", "inv_T_kd", "T_kd", "w_ce_s", "w_kd_s",
          "w_tc", "w_nc", "w_row", "w_col"}


def compile_all():
    """Child-process body: compile each kernel for sm_90; prints SKIP when no NVIDIA compiler exists."""
    import triton
    import triton.language as tl
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        print("SKIP: this Triton has no GPUTarget/ASTSource")
        return
    from hcd.kernels.gemm import _TILES_16, _TILES_32, _gemm_kernel
    from hcd.kernels.hcd_head import _head_row_kernel
    from hcd.kernels.hcd_step import _dz_sum_kernel, _loss_row_kernel
    from hcd.kernels.student import _student_row_kernel
    from hcd.kernels.baselines import _dkd_row_kernel, _ofa_row_kernel
    from hcd.kernels.baselines_dist import _dist_col_kernel, _dist_row_kernel, _dist_softmax_bwd_kernel

    def build(fn, pointers, consts, num_warps):
        sig = {a: "constexpr" if a in consts else pointers.get(a, "fp32" if a in FLOATS else "i32")
               for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})

    tls = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
    for act, weight in (("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")):
        # labels (*i64) and soft targets (SOFT: a (B, C) float target, fp32 as timm's Mixup makes it under
        # bf16 autocast, else the activations' dtype)
        for soft, y in ((False, "*i64"), (True, "*fp32" if act == "bf16" else f"*{act}")):
            build(_head_row_kernel, {"z_ptr": "*fp32", "zt_ptr": f"*{act}", "zs_ptr": f"*{act}", "y_ptr": y,
                                     "dz_ptr": f"*{act}", "dzl_ptr": "*fp32", "loss_ptr": "*fp32"},
                  dict(KL_TARGET_GRAD=True, TEACHER_GRAD=True, WRITE_DZ=True, SOFT=soft, BLOCK_C=1024, BLOCK_N=4), 8)
            for detach in (False, True):
                build(_loss_row_kernel, {"z_ptr": "*fp32", "zt_ptr": f"*{act}", "zs_ptr": f"*{act}", "y_ptr": y,
                                         "dz_ptr": "*fp32", "dzl_ptr": "*fp32", "part_ptr": "*fp32"},
                      dict(KL_TARGET_GRAD=not detach, WRITE_DZ=True, SOFT=soft, BLOCK_C=1024, BLOCK_N=4, BLOCK_K=32),
                      8)
            build(_student_row_kernel, {"zs_ptr": f"*{act}", "zt_ptr": f"*{act}", "y_ptr": y, "dz_ptr": "*fp32",
                                        "loss_ptr": "*fp32"}, dict(TEACHER_GRAD=True, SOFT=soft, BLOCK=1024), 4)
        build(_dz_sum_kernel, {"buf_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": f"*{act}"}, dict(BLOCK=1024), 4)
        for row_kernel in (_dkd_row_kernel, _ofa_row_kernel):
            build(row_kernel, {"zs_ptr": f"*{act}", "zt_ptr": f"*{act}", "y_ptr": "*i64", "dz_ptr": "*fp32",
                               "loss_ptr": "*fp32"}, dict(BLOCK=1024), 4)
        build(_dist_row_kernel, {"zs_ptr": f"*{act}", "zt_ptr": f"*{act}", "p_ptr": "*fp32", "dp_ptr": "*fp32",
                                 "part_ptr": "*fp32"}, dict(BLOCK=1024), 4)
        bm, bn, bk, warps = (_TILES_32 if act == "fp32" else _TILES_16)[0]
        common = dict(DOT_DTYPE=tls[act], PRECISION="ieee" if act == "fp32" else "tf32", BM=bm, BN=bn, BK=bk)
        build(_gemm_kernel, {"a1_ptr": f"*{act}", "a2_ptr": f"*{act}", "b1_ptr": f"*{weight}", "b2_ptr": f"*{weight}",
                             "c_ptr": "*fp32", "bias_ptr": f"*{weight}", "scale_ptr": "*fp32", "colsum_ptr": "*fp32"},
              dict(SPLIT_N=False, HAS_BIAS=True, HAS_SCALE=False, COLSUM=False, **common), warps)
        # backward: the fp32 dZ against 16-bit x as TF32 dots (fp32 activations: IEEE)
        bm, bn, bk, warps = _TILES_32[0]
        back = dict(DOT_DTYPE=tl.float32, PRECISION="ieee" if act == "fp32" else "tf32", BM=bm, BN=bn, BK=bk)
        build(_gemm_kernel, {"a1_ptr": "*fp32", "a2_ptr": "*fp32", "b1_ptr": f"*{act}", "b2_ptr": f"*{act}",
                             "c_ptr": f"*{weight}", "bias_ptr": f"*{weight}", "scale_ptr": "*fp32",
                             "colsum_ptr": f"*{weight}"},
              dict(SPLIT_N=True, HAS_BIAS=False, HAS_SCALE=True, COLSUM=True, **back), warps)
    build(_dist_col_kernel, {"p_ptr": "*fp32", "dp_ptr": "*fp32", "part_ptr": "*fp32"}, dict(BB=64, BC=32), 4)
    build(_dist_softmax_bwd_kernel, {"p_ptr": "*fp32", "dp_ptr": "*fp32"}, dict(BLOCK=1024), 4)
    print("COMPILED")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = "from tests.kernels.test_sm90_compile import compile_all; compile_all()"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if "SKIP" in out.stdout:
        pytest.skip(out.stdout.strip())
    if out.returncode != 0 and ("ptxas" in out.stderr and "not found" in out.stderr.lower()):
        pytest.skip("no ptxas in this Triton build")
    assert out.returncode == 0 and "COMPILED" in out.stdout, out.stderr[-4000:]
