"""FLOP / byte model of the fused launches: pure Python (no Triton import), read by the benchmarks.

Bytes are compulsory DRAM traffic; the launch plans behind these numbers are described at the top of
kernels/hcd_head.py and kernels/student.py.
"""


def head_flops_bytes(B, C, n, Dp, Dt, dtype_bytes, weight_bytes=None, bias=True, x_teacher_grad=True):
    """Per-launch (flops, bytes) of one stage's fused head, forward + backward with every grad needed
    (x_teacher_grad=False: the teacher feature is frozen, as in training, and dX covers the Dp columns only).

    Bytes are compulsory DRAM traffic (reloads that hit L2 are not counted). Returns a dict
    launch name -> (flops, bytes) plus "total".
    """
    e, w = dtype_bytes, (weight_bytes or dtype_bytes)
    N, D = n * C, Dp + Dt
    Dx = D if x_teacher_grad else Dp  # the columns of dX (and of W read by its GEMM)
    nb = N * w if bias else 0
    launches = {
        "z_gemm": (2 * B * N * D, B * D * e + N * D * w + nb + 4 * B * N),
        "row": (60 * B * N + 2 * B * n * N, 4 * B * N + 2 * B * C * e + 8 * B + 4 * B * N + 4 * B * C + 16 * B),
        "loss_sum": (4 * B, 16 * B + 16),
        "dx_gemm": (2 * B * N * Dx, 4 * B * N + N * Dx * w + B * Dx * e),
        "dw_gemm": (2 * N * B * D + B * N, 4 * B * N + B * D * e + N * D * w + nb),
        "dz_scale": (B * C, B * C * (4 + e)),
    }
    launches["total"] = tuple(sum(v[i] for v in launches.values()) for i in range(2))
    return launches


def student_flops_bytes(B, C, dtype_bytes):
    """Per-launch (flops, bytes) of the fused student loss (kernels/student.py), as head_flops_bytes."""
    e = dtype_bytes
    launches = {"row": (25 * B * C, 2 * B * C * e + 8 * B + 4 * B * C + 12 * B),
                "loss_sum": (3 * B, 12 * B + 12),
                "dz_scale": (B * C, B * C * (4 + e))}
    launches["total"] = tuple(sum(v[i] for v in launches.values()) for i in range(2))
    return launches
