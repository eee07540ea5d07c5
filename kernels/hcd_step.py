"""The whole HCD loss of one step in one call, behind hcd.kernels.hcd_loss: S stages' heads + the student's
CE and KD. (The module is not named hcd_loss: importing it would replace the function on the package.)

Launch plan (S stages, B rows, C classes, n sub-logits, N = n*C, D = Dp + Dt, K = 6 + 3*S loss columns):
  forward
    1. _gemm_kernel     one grouped launch, grid (M tiles, N tiles, S): Z[s] = x_s[s] W[s, :, :Dp]^T
                        + x_t W[s, :, Dp:]^T + b[s], fp32 (S, B, N); x_t is shared (group stride 0).
    2. _loss_row_kernel grid (B, S), one program per (row, stage): that stage's head terms and dZ as in
                        kernels/head_rows.py, and on stage 0's programs also the student's CE + KD; writes
                        dZ (fp32, per sample), that stage's fp32 share of dL/dz_s into an (S, B, C) buffer
                        (stage 0's share holds the student terms' gradient too), and one K-column row of
                        loss partials [total, ce, kd, sce, skl, ol, sce_1..S, skl_1..S, ol_1..S] holding
                        its own terms only (zeros elsewhere). No atomics. A (B, C) soft target: the
                        SOFT constexpr (kernels/_common.py), read by every stage's programs.
    3. partials.sum     (B, S, K) -> (K,) in one reduction: every part, stage sums included, and the total.
  backward (grad_output g read on device; no host sync)
    4. _gemm_kernel     one grouped launch: dX[s] = (g/B) dZ[s] W[s, :, :Dp] -> (S, B, Dp) in x's dtype.
    5. _gemm_kernel     one grouped launch: dW[s] = (g/B) dZ[s]^T [x_s[s] | x_t], db[s] = its column sums
                        from the same tiles, in the weights' dtype.
    6. _dz_sum_kernel   dz_s = g * sum_s buffer[s], rounded once into the logits' dtype.
  Six launches per step whatever S is (each of 4-6 only when its inputs need grad). An x_students
  sequence costs one torch.stack more (a tensor (S, B, Dp) does not); a trainable bias under a frozen
  weight sums dZ with torch ops instead of launch 5.

Teacher side: the teacher is frozen in training, so hcd_loss computes no gradient for teacher_logits or
x_teacher; kernels/validation.py refuses them when they require grad (every backend alike).
float64 inputs and an empty batch run the float64/eager reference (kernels/reference.py:hcd_loss_eager).
"""
import functools

import torch
import triton
import triton.language as tl

from hcd.kernels import reference
from hcd.kernels._common import row_target
from hcd.kernels.gemm import _backward_dot, _gemm
from hcd.kernels.head_rows import head_row_terms
from hcd.kernels.launch import cdiv, next_pow2, row_num_warps
from hcd.kernels.student import student_row_terms

_SUM_BLOCK = 1024


@triton.jit
def _loss_row_kernel(z_ptr, zt_ptr, zs_ptr, y_ptr, dz_ptr, dzl_ptr, part_ptr,
                     B, C, n, S, alpha_s, alpha_t, eps, inv_T, T, theta, w_ce, w_kl, w_ol,
                     ce_weight, kl_weight, ol_weight, inv_bn, inv_b_pairs, inv_B, inv_T_kd, T_kd, w_ce_s, w_kd_s,
                     KL_TARGET_GRAD: tl.constexpr, WRITE_DZ: tl.constexpr, SOFT: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Weights as in kernels/hcd_head.py (per sample; dZ stored B times the true gradient), and the
    # student's w_ce_s = ce_weight/B, w_kd_s = kd_weight/B (true scale, like the dz_s buffer).
    row = tl.program_id(0).to(tl.int64)
    stage = tl.program_id(1)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    lrow = row * C
    zrow = (stage * B + row) * C * n
    zt = tl.load(zt_ptr + lrow + offs, mask=mask, other=0.0).to(tl.float32)
    zs = tl.load(zs_ptr + lrow + offs, mask=mask, other=0.0).to(tl.float32)
    valid, is_y, t, sum_t = row_target(y_ptr, row, C, offs, mask, SOFT)  # SOFT: y_ptr is the (B, C) target
    ce_row, kl_row, ol_sum, dzs, _sum_g = head_row_terms(
        z_ptr, dz_ptr, zrow, zt, zs, is_y, valid, t, sum_t, n, C, offs, mask, alpha_s, alpha_t, eps, inv_T, T,
        theta, w_ce, w_kl, w_ol, inv_B, KL_TARGET_GRAD, False, WRITE_DZ, SOFT, BLOCK_C, BLOCK_N)
    sce = ce_row * inv_bn
    skl = kl_row * inv_bn
    ol = ol_sum * inv_b_pairs
    total = ce_weight * sce + kl_weight * skl + ol_weight * ol
    ce = 0.0
    kd = 0.0
    if stage == 0:  # the student's own terms, once per row
        s_ce, s_kd, g_s, _g_t = student_row_terms(zs, zt, is_y, valid, t, sum_t, mask, C, eps, inv_T_kd, T_kd,
                                                  w_ce_s, w_kd_s, False, SOFT)
        dzs += g_s
        total += w_ce_s * s_ce + w_kd_s * s_kd
        ce = s_ce * inv_B
        kd = s_kd * inv_B
    tl.store(dzl_ptr + stage * B * C + lrow + offs, dzs, mask=mask)

    # partials row [total, ce, kd, sce, skl, ol, sce_1..S, skl_1..S, ol_1..S]: this program's terms only
    k = tl.arange(0, BLOCK_K)
    term = tl.where(k >= 6, (k - 6) // S, k - 3)  # 0: sce, 1: skl, 2: ol (for k >= 3)
    own = ((k >= 3) & (k < 6)) | ((k >= 6) & ((k - 6) % S == stage))
    stage_vals = tl.where(term == 0, sce, tl.where(term == 1, skl, ol))
    vals = tl.where(k == 0, total, tl.where(k == 1, ce, tl.where(k == 2, kd, tl.where(own, stage_vals, 0.0))))
    K = 6 + 3 * S
    tl.store(part_ptr + (row * S + stage) * K + k, vals, mask=k < K)


@triton.jit
def _dz_sum_kernel(buf_ptr, g_ptr, out_ptr, S, numel, BLOCK: tl.constexpr):
    """out = g * sum_s buf[s], fp32 sum, one rounding into out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(S):
        acc += tl.load(buf_ptr + s * numel + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr).to(tl.float32)
    tl.store(out_ptr + offs, (acc * g).to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=64)
def _row_scalars(cfg, B):
    """The row kernel's float arguments for a config and batch (cached: the host path is per step)."""
    n = cfg.n_sublogits
    return (float(cfg.student_scale), float(cfg.teacher_scale), float(cfg.label_smoothing),
            1.0 / cfg.temperature, float(cfg.temperature), float(cfg.ol_threshold),
            cfg.ce_weight / n, cfg.sublogit_kl_weight / n, cfg.ol_weight / (n * (n - 1)) if n > 1 else 0.0,
            float(cfg.ce_weight), float(cfg.sublogit_kl_weight), float(cfg.ol_weight),
            1.0 / (B * n), 1.0 / (B * max(n * (n - 1), 1)), 1.0 / B,
            1.0 / cfg.kd_temperature, float(cfg.kd_temperature), cfg.ce_weight / B, cfg.kd_weight / B)


def _row_launch(z, z_t, z_s, target, dz, dzl, partials, cfg, *, write_dz):
    """Launch 2 of the plan over Z (S, B, n*C) fp32."""
    S, B, _ = z.shape
    C = z_t.shape[1]
    block_c = next_pow2(C)
    _loss_row_kernel[(B, S)](
        z, z_t, z_s, target, dz, dzl, partials, B, C, cfg.n_sublogits, S, *_row_scalars(cfg, B),
        KL_TARGET_GRAD=not cfg.detach_sublogit_target, WRITE_DZ=write_dz, SOFT=target.is_floating_point(),
        BLOCK_C=block_c,
        BLOCK_N=max(next_pow2(cfg.n_sublogits), 2), BLOCK_K=next_pow2(partials.shape[2]),
        num_warps=row_num_warps(2 * block_c))


class _HCDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_s, x_t, weights, biases, z_t, z_s, target, cfg):
        x_s, x_t, weights, z_t, z_s, target = (t.contiguous() for t in (x_s, x_t, weights, z_t, z_s, target))
        biases = biases.contiguous() if biases is not None else None
        S, B, Dp = x_s.shape
        C = z_t.shape[1]
        dev, act = x_s.device, x_s.dtype
        need = ctx.needs_input_grad
        need_dz = need[0] or need[2] or need[3]
        if S * B * C >= 2 ** 31:
            raise ValueError("hcd_loss: S*B*C >= 2^31, beyond the fused kernels' int32 indexing")

        # 1. Z for every stage in one launch, fp32
        z = torch.empty((S, B, cfg.n_sublogits * C), dtype=torch.float32, device=dev)
        w_t = weights.transpose(1, 2)
        _gemm(z, x_s, w_t[:, :Dp], a2=x_t, b2=w_t[:, Dp:], bias=biases, dot_dtype=act)
        # 2. every loss term and gradient, (row, stage) programs
        dz = torch.empty_like(z) if need_dz else z
        dzl = torch.empty((S, B, C), dtype=torch.float32, device=dev)
        partials = torch.empty((B, S, 6 + 3 * S), dtype=torch.float32, device=dev)
        _row_launch(z, z_t, z_s, target, dz, dzl, partials, cfg, write_dz=need_dz)

        ctx.save_for_backward(x_s, x_t, weights, dz if need_dz else None, dzl)
        ctx.bias_dtype = biases.dtype if biases is not None else None
        ctx.logits_dtype = z_s.dtype
        # 3. one reduction, handed out as two outputs: the total (differentiable) and the parts (not), so the
        # backward gets the total's gradient as is (see kernels/hcd_head.py)
        sums = partials.sum((0, 1))
        total, parts = sums[0], sums[1:]
        ctx.mark_non_differentiable(parts)
        ctx.set_materialize_grads(False)
        return total, parts

    @staticmethod
    def backward(ctx, g, _parts):
        x_s, x_t, weights, dz, dzl = ctx.saved_tensors
        need = ctx.needs_input_grad
        if g is None:
            return (None,) * 8
        S, B, Dp = x_s.shape
        dx = dw = db = dzs = None
        if need[0]:  # 4. dX of every stage: the student columns of W only (x_teacher is frozen)
            dx = torch.empty_like(x_s)
            _gemm(dx, dz, weights[:, :, :Dp], scale=g, alpha=1.0 / B, **_backward_dot(x_s.dtype))
        if need[2]:  # 5. dW and db of every stage
            dw = torch.empty_like(weights)
            db = torch.empty(dz.shape[::2], dtype=ctx.bias_dtype, device=dz.device) if need[3] else None
            _gemm(dw, dz.transpose(1, 2), x_s, b2=x_t, split_n=True, scale=g, alpha=1.0 / B, colsum=db,
                  **_backward_dot(x_s.dtype))
        elif need[3]:  # trainable biases with frozen weights: no GEMM needed
            db = (dz.sum(1) * (g / B)).to(ctx.bias_dtype)
        if need[5]:  # 6. the student logits' gradient, every stage's share and the student terms'
            dzs = torch.empty(dzl.shape[1:], dtype=ctx.logits_dtype, device=dzl.device)
            _dz_sum_kernel[(cdiv(dzs.numel(), _SUM_BLOCK),)](dzl, g, dzs, S, dzs.numel(), BLOCK=_SUM_BLOCK)
        return dx, None, dw, db, None, dzs, None, None


def hcd_loss_triton(x_students, x_teacher, weights, biases, teacher_logits, student_logits, target, cfg):
    """(total, [ce, kd, sce, skl, ol, sce_1..S, skl_1..S, ol_1..S]); the parts are detached."""
    args = (x_students, x_teacher, weights, biases, teacher_logits, student_logits, target, cfg)
    if x_teacher.dtype == torch.float64 or x_teacher.shape[0] == 0:
        total, values = reference.hcd_loss_eager(*args)
        return total, [v.detach() for v in values]
    if not isinstance(x_students, torch.Tensor):
        x_students = torch.stack(tuple(x_students))
    total, parts = _HCDLoss.apply(x_students, *args[1:])
    return total, parts.unbind(0)
