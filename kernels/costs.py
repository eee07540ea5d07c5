"""FLOP / byte model of the fused launches: pure Python (no Triton import), read by the benchmarks.

Bytes are compulsory DRAM traffic; the launch plans behind these numbers are described at the top of
kernels/hcd_head.py, kernels/student.py and kernels/hcd_step.py (hcd_loss: the whole step's loss).
"""


def _target_read(B, C, soft_target_bytes):
    """Bytes of the row kernels' target read: (B,) int64 labels, or a (B, C) soft target of that many bytes
    per entry (docs/method.md, Soft targets)."""
    return B * C * soft_target_bytes if soft_target_bytes else 8 * B


def head_flops_bytes(B, C, n, Dp, Dt, dtype_bytes, weight_bytes=None, bias=True, x_teacher_grad=True,
                     soft_target_bytes=0):
    """Per-launch (flops, bytes) of one stage's fused head, forward + backward with every grad needed
    (x_teacher_grad=False: the teacher feature is frozen, as in training, and dX covers the Dp columns only;
    soft_target_bytes: the entry size of a (B, C) soft target, 0 for int64 labels).

    Bytes are compulsory DRAM traffic (reloads that hit L2 are not counted). Returns a dict
    launch name -> (flops, bytes) plus "total".
    """
    e, w = dtype_bytes, (weight_bytes or dtype_bytes)
    N, D = n * C, Dp + Dt
    Dx = D if x_teacher_grad else Dp  # the columns of dX (and of W read by its GEMM)
    nb = N * w if bias else 0
    launches = {
        "z_gemm": (2 * B * N * D, B * D * e + N * D * w + nb + 4 * B * N),
        "row": (60 * B * N + 2 * B * n * N,
                4 * B * N + 2 * B * C * e + _target_read(B, C, soft_target_bytes) + 4 * B * N + 4 * B * C + 16 * B),
        "loss_sum": (4 * B, 16 * B + 16),
        "dx_gemm": (2 * B * N * Dx, 4 * B * N + N * Dx * w + B * Dx * e),
        "dw_gemm": (2 * N * B * D + B * N, 4 * B * N + B * D * e + N * D * w + nb),
        "dz_scale": (B * C, B * C * (4 + e)),
    }
    launches["total"] = tuple(sum(v[i] for v in launches.values()) for i in range(2))
    return launches


def student_flops_bytes(B, C, dtype_bytes, soft_target_bytes=0):
    """Per-launch (flops, bytes) of the fused student loss (kernels/student.py), as head_flops_bytes."""
    e = dtype_bytes
    launches = {"row": (25 * B * C, 2 * B * C * e + _target_read(B, C, soft_target_bytes) + 4 * B * C + 12 * B),
                "loss_sum": (3 * B, 12 * B + 12),
                "dz_scale": (B * C, B * C * (4 + e))}
    launches["total"] = tuple(sum(v[i] for v in launches.values()) for i in range(2))
    return launches


def loss_flops_bytes(S, B, C, n, Dp, Dt, dtype_bytes, weight_bytes=None, bias=True, soft_target_bytes=0):
    """Per-launch (flops, bytes) of hcd_loss's fused plan (kernels/hcd_step.py): S stages' heads and the
    student's CE + KD, forward + backward, every trainable gradient needed (x_students, weights, biases,
    student logits; the teacher side is frozen, so dX covers the Dp columns only). x_students is one
    (S, B, Dp) tensor (a sequence costs a torch.stack more, not counted).

    Compulsory DRAM traffic as in head_flops_bytes; what the stages share is counted once: x_teacher (read by
    every stage's tiles of the grouped GEMMs, group stride 0), the logits and labels (read by every stage's
    row programs). Per (row, stage) the row kernel writes a K = 6 + 3*S column row of loss partials.
    soft_target_bytes as in head_flops_bytes."""
    e, w = dtype_bytes, (weight_bytes or dtype_bytes)
    N, D, K = n * C, Dp + Dt, 6 + 3 * S
    nb = S * N * w if bias else 0
    x = S * B * Dp * e + B * Dt * e  # x_students and the shared x_teacher
    launches = {
        "z_gemm": (2 * S * B * N * D, x + S * N * D * w + nb + 4 * S * B * N),
        # per stage the head's row terms; the student's once (on stage 0's programs)
        "row": (S * (60 * B * N + 2 * B * n * N) + 25 * B * C,
                4 * S * B * N + 2 * B * C * e + _target_read(B, C, soft_target_bytes) + 4 * S * B * N + 4 * S * B * C
                + 4 * B * S * K),
        "loss_sum": (B * S * K, 4 * B * S * K + 4 * K),
        "dx_gemm": (2 * S * B * N * Dp, 4 * S * B * N + S * N * Dp * w + S * B * Dp * e),
        "dw_gemm": (2 * S * N * B * D + S * B * N, 4 * S * B * N + x + S * N * D * w + nb),
        "dz_sum": ((S + 1) * B * C, 4 * S * B * C + B * C * e),  # S adds and the grad_output multiply
    }
    launches["total"] = tuple(sum(v[i] for v in launches.values()) for i in range(2))
    return launches
