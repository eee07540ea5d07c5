"""Fused student loss: CE with label smoothing + KD (temperature T_kd, T_kd^2-scaled, batchmean).

Launch plan (B rows of C classes, e = bytes per logit):
  forward  1. _student_row_kernel, one program per row: both softmaxes, the two losses and d(total)/dz
              for the student (and the teacher when it requires grad), all fp32; per-row loss partials.
              FLOPs ~ 25*B*C; bytes 2*B*C*e read + B*C*4 (x2 with teacher grad) written + 20*B
              (+ the B*C entries of a soft target, SOFT, instead of the 8*B label bytes).
           2. partials.sum(0): B*3 floats -> (ce, kd, total), three 0-dim outputs. No atomics, no host sync.
  backward 3. one multiply of the saved fp32 gradients by grad_output, cast to the logits dtype on store
              (torch.mul(..., out=...): one rounding). B*C*(4+e) bytes (x2 with teacher grad).
float64 inputs run the float64 eager reference instead (a debugging dtype; the kernel is fp32-only).
"""
import torch
import triton
import triton.language as tl

from hcd.kernels import reference
from hcd.kernels._common import ce_grad, row_target, smoothed_ce, smoothed_soft_ce, softmax_stats
from hcd.kernels.launch import next_pow2, row_num_warps


@triton.jit
def student_row_terms(zs, zt, is_y, valid, t, sum_t, mask, C, eps, inv_T, T, w_ce, w_kd,
                      TEACHER_GRAD: tl.constexpr, SOFT: tl.constexpr):
    """One row's (ce, kd, g_s, g_t): CE_eps(z_s, y) (NaN for an invalid label; SOFT: the soft target row t
    with sum sum_t, else t and sum_t are unused), T^2 KL(p_t || q_s), and w_ce dCE/dz_s + w_kd dKD/dz_s,
    w_kd dKD/dz_t (zeros unless TEACHER_GRAD), all fp32."""
    if SOFT:
        ce, m, e, s, log_s = smoothed_soft_ce(zs, mask, t, sum_t, eps, C)
    else:
        ce, m, e, s, log_s = smoothed_ce(zs, mask, is_y, eps, C)
    ce = tl.where(valid, ce, float("nan"))
    g_ce = ce_grad(e / s, is_y, t, sum_t, eps, C, SOFT) * tl.where(valid, w_ce, 0.0)

    # KD: T^2 * sum p (log p - log q), p = softmax(zt/T) the target, q = softmax(zs/T) the learner.
    a_s = zs * inv_T
    a_t = zt * inv_T
    m_s, e_s, s_s, log_s_s = softmax_stats(a_s, mask)
    m_t, e_t, s_t, log_s_t = softmax_stats(a_t, mask)
    log_ratio = (a_t - m_t) - (a_s - m_s) + (log_s_s - log_s_t)  # log p - log q, fp32
    p = e_t / s_t
    q = e_s / s_s
    kl = tl.sum(tl.where(mask, p * log_ratio, 0.0), axis=0)
    kd = T * T * kl

    # d(T^2 KL)/dz_s = T (q - p); d/dz_t = T p (log p - log q - KL).
    g_s = g_ce + (w_kd * T) * (q - p)
    g_t = tl.zeros_like(g_s)
    if TEACHER_GRAD:
        g_t = (w_kd * T) * p * (log_ratio - kl)
    return ce, kd, g_s, g_t


@triton.jit
def _student_row_kernel(zs_ptr, zt_ptr, y_ptr, dz_ptr, loss_ptr,
                        B, C, eps, inv_T, T, w_ce, w_kd,
                        TEACHER_GRAD: tl.constexpr, SOFT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * C must not overflow for large B*C
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    base = row * C
    zs = tl.load(zs_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    zt = tl.load(zt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    valid, is_y, t, sum_t = row_target(y_ptr, row, C, offs, mask, SOFT)  # SOFT: y_ptr is the (B, C) target
    # w_* already hold weight / B
    ce, kd, g_s, g_t = student_row_terms(zs, zt, is_y, valid, t, sum_t, mask, C, eps, inv_T, T, w_ce, w_kd,
                                         TEACHER_GRAD, SOFT)
    tl.store(dz_ptr + base + offs, g_s, mask=mask)
    if TEACHER_GRAD:
        tl.store(dz_ptr + B * C + base + offs, g_t, mask=mask)

    inv_B = 1.0 / B
    tl.store(loss_ptr + row * 3 + 0, ce * inv_B)
    tl.store(loss_ptr + row * 3 + 1, kd * inv_B)
    tl.store(loss_ptr + row * 3 + 2, w_ce * ce + w_kd * kd)


class _StudentLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, target, cfg):
        zs, zt, y = student_logits.contiguous(), teacher_logits.contiguous(), target.contiguous()
        B, C = zs.shape
        teacher_grad = ctx.needs_input_grad[1]
        # fp32 gradient buffer: [0] student, [1] teacher; scaled by grad_output and rounded once in backward.
        dz = torch.empty((2 if teacher_grad else 1, B, C), dtype=torch.float32, device=zs.device)
        partials = torch.empty((B, 3), dtype=torch.float32, device=zs.device)
        block = next_pow2(C)
        _student_row_kernel[(B,)](
            zs, zt, y, dz, partials, B, C,
            float(cfg.label_smoothing), 1.0 / cfg.kd_temperature, float(cfg.kd_temperature),
            cfg.ce_weight / B, cfg.kd_weight / B,
            TEACHER_GRAD=teacher_grad, SOFT=y.is_floating_point(), BLOCK=block, num_warps=row_num_warps(block))
        ctx.save_for_backward(dz)
        ctx.dtype = zs.dtype
        # (ce, kd, total) from one reduction as three outputs; only total is differentiable (see _HCDHead)
        ce, kd, total = partials.sum(0).unbind(0)
        ctx.mark_non_differentiable(ce, kd)
        ctx.set_materialize_grads(False)
        return total, ce, kd

    @staticmethod
    def backward(ctx, g, *_parts):
        (dz,) = ctx.saved_tensors
        if g is None:
            return None, None, None, None
        # Always multiply on device: testing grad_output == 1 would need a host sync.
        out = torch.empty(dz.shape, dtype=ctx.dtype, device=dz.device)
        torch.mul(dz, g, out=out)
        d_student = out[0] if ctx.needs_input_grad[0] else None
        d_teacher = out[1] if ctx.needs_input_grad[1] else None
        return d_student, d_teacher, None, None


def student_loss_triton(student_logits, teacher_logits, target, cfg):
    """(total, ce, kd): total = ce_weight*ce + kd_weight*kd; ce and kd are detached 0-dim tensors."""
    if student_logits.dtype == torch.float64 or student_logits.shape[0] == 0:
        return reference.student_loss_eager(student_logits, teacher_logits, target, cfg)
    return _StudentLoss.apply(student_logits, teacher_logits, target, cfg)
