"""Fused baseline losses: DKD and OFA row kernels (DIST: kernels/baselines_dist.py) and the autograd Function
all three share. Definitions and their differences from the reference code: kernels/baselines_reference.py.

Launch plan (B rows of C classes, e = bytes per logit):
  forward  1. one row kernel (_dkd_row_kernel or _ofa_row_kernel), one program per row: the softmaxes the loss
              needs, the row's loss and d(loss)/dz for the first argument, all fp32; one loss partial per row.
              Bytes 2*B*C*e read + B*C*4 written + 12*B. DKD does five masked softmax passes over the row
              in registers (student and teacher, whole row and non-target classes; NCKD's masked rows),
              OFA four.
           2. partials.sum(): the 0-dim loss. No atomics, no host sync.
  backward 3. one multiply of the saved fp32 gradient by grad_output, cast to the logits' dtype on store.
The teacher is frozen (hcd.kernels refuses a teacher_logits that requires grad), so no teacher gradient.
float64 inputs and B = 0 run the eager reference instead (the kernels are fp32-only).
"""
import torch
import triton
import triton.language as tl

from hcd.kernels import baselines_reference as ref
from hcd.kernels._common import expm1, log1p, other_mass, row_label, softmax_stats
from hcd.kernels.launch import next_pow2, row_num_warps


@triton.jit
def _load_row(zs_ptr, zt_ptr, C, inv_T, BLOCK: tl.constexpr):
    """(row, offs, mask, base, a_s, a_t): this program's row of both logits divided by T, in fp32."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * C must not overflow for large B*C
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    base = row * C
    a_s = tl.load(zs_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) * inv_T
    a_t = tl.load(zt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) * inv_T
    return row, offs, mask, base, a_s, a_t


@triton.jit
def _log_at(a, is_y, m, log_s):
    """log p_y = a_y - lse(a) of a row with softmax_stats (m, log_s)."""
    return (tl.sum(tl.where(is_y, a, 0.0), axis=0) - m) - log_s


@triton.jit
def _labelled_rows(zs_ptr, zt_ptr, y_ptr, C, inv_T, BLOCK: tl.constexpr):
    """_load_row with the row's label and the softmax statistics DKD and OFA share: (row, offs, mask, base,
    valid, is_y, a_s, a_t, m_s, log_s_s, m_t, log_s_t, q_s, lbo_s, lbo_t), q and lbo from other_mass."""
    row, offs, mask, base, a_s, a_t = _load_row(zs_ptr, zt_ptr, C, inv_T, BLOCK)
    valid, is_y = row_label(y_ptr, row, C, offs)
    m_s, e_s, s_s, log_s_s = softmax_stats(a_s, mask)
    m_t, e_t, s_t, log_s_t = softmax_stats(a_t, mask)
    q_s, lbo_s = other_mass(a_s, mask, is_y, m_s, log_s_s)
    _, lbo_t = other_mass(a_t, mask, is_y, m_t, log_s_t)
    return row, offs, mask, base, valid, is_y, a_s, a_t, m_s, log_s_s, m_t, log_s_t, q_s, lbo_s, lbo_t


@triton.jit
def _dkd_row_kernel(zs_ptr, zt_ptr, y_ptr, dz_ptr, loss_ptr, C, inv_T, T, w_tc, w_nc, BLOCK: tl.constexpr):
    """w_tc = alpha / B, w_nc = beta / B. TCKD over the binary (target, other) probabilities in log space;
    its gradient w.r.t. a_s is (b_s,o - b_t,o) * (q_s,c off the target, -1 at it), q_s the non-target softmax,
    so nothing goes through 1 - p_y. NCKD is the KL of the -1000-masked rows: gradient q' - p'."""
    row, offs, mask, base, valid, is_y, a_s, a_t, m_s, log_s_s, m_t, log_s_t, q_s, lbo_s, lbo_t = \
        _labelled_rows(zs_ptr, zt_ptr, y_ptr, C, inv_T, BLOCK)
    lby_s = _log_at(a_s, is_y, m_s, log_s_s)
    lby_t = _log_at(a_t, is_y, m_t, log_s_t)
    bo_s = tl.exp(lbo_s)
    bo_t = tl.exp(lbo_t)
    tckd = T * T * (tl.exp(lby_t) * (lby_t - lby_s) + bo_t * (lbo_t - lbo_s))
    g_tc = (bo_s - bo_t) * tl.where(is_y, -1.0, q_s)

    gt = is_y.to(tl.float32) * 1000.0  # DKD_MASK
    n_s = a_s - gt
    n_t = a_t - gt
    mn_s, en_s, sn_s, log_sn_s = softmax_stats(n_s, mask)
    mn_t, en_t, sn_t, log_sn_t = softmax_stats(n_t, mask)
    log_ratio = (n_t - mn_t) - (n_s - mn_s) + (log_sn_s - log_sn_t)  # log p' - log q'
    p = en_t / sn_t
    nckd = T * T * tl.sum(tl.where(mask, p * log_ratio, 0.0), axis=0)
    g_nc = en_s / sn_s - p

    g = tl.where(valid, (w_tc * T) * g_tc + (w_nc * T) * g_nc, 0.0)  # d/dz = T * d/da (T^2 / T)
    tl.store(dz_ptr + base + offs, g, mask=mask)
    tl.store(loss_ptr + row, tl.where(valid, w_tc * tckd + w_nc * nckd, float("nan")))


@triton.jit
def _ofa_row_kernel(zs_ptr, zt_ptr, y_ptr, dz_ptr, loss_ptr, C, inv_T, eps, inv_B, BLOCK: tl.constexpr):
    """w_c = (p_t + 1_y)^eps - 1_y (expm1(eps log1p(p_t,y)) at the target, p_t,y itself for eps = 1); loss
    -sum w log p_s. d/da_s = p_s W - w with W = sum w = 1 + D, D = sum (w - p_t) (exactly 0 for eps = 1), is
    written as (p_s - w) + p_s D, and at a target with p_s,y > 1/2 as (b_t,o - b_s,o) + sum_{c!=y}(w - p_t)
    - b_s,o D (b_o = 1 - p_y from other_mass): nothing cancels when the student matches the teacher or p_y -> 1."""
    row, offs, mask, base, valid, is_y, a_s, a_t, m_s, log_s_s, m_t, log_s_t, _, lbo_s, lbo_t = \
        _labelled_rows(zs_ptr, zt_ptr, y_ptr, C, inv_T, BLOCK)
    off = mask & (is_y == 0)
    logp_s = tl.where(mask, (a_s - m_s) - log_s_s, 0.0)
    logp_t = tl.where(mask, (a_t - m_t) - log_s_t, 0.0)
    p_s = tl.where(mask, tl.exp(logp_s), 0.0)
    p_t = tl.where(off, tl.exp(logp_t), 0.0)             # off the target only
    w = tl.where(off, tl.exp(eps * logp_t), 0.0)
    p_ty = tl.exp(tl.sum(tl.where(is_y, logp_t, 0.0), axis=0))
    w_y = tl.where(eps == 1.0, p_ty, expm1(eps * log1p(p_ty)))
    dw_o = tl.sum(w - p_t, axis=0)
    D = dw_o + (w_y - p_ty)
    p_sy = tl.sum(tl.where(is_y, p_s, 0.0), axis=0)
    bo_s = tl.exp(lbo_s)
    g_y = tl.where(p_sy > 0.5, (tl.exp(lbo_t) - bo_s) + dw_o - bo_s * D, (p_sy - w_y) + p_sy * D)
    g = tl.where(is_y, g_y, (p_s - w) + p_s * D)
    loss = -(tl.sum(w * logp_s, axis=0) + w_y * tl.sum(tl.where(is_y, logp_s, 0.0), axis=0))
    g = tl.where(valid, g * (inv_T * inv_B), 0.0)
    tl.store(dz_ptr + base + offs, g, mask=mask)
    tl.store(loss_ptr + row, tl.where(valid, loss * inv_B, float("nan")))


class FusedLoss(torch.autograd.Function):
    """A scalar loss whose fp32 gradient w.r.t. its first input was computed in the forward by
    run(logits, *args) -> (loss, grad); backward multiplies it by grad_output (one rounding on store)."""

    @staticmethod
    def forward(ctx, logits, run, *args):
        loss, grad = run(logits, *args)
        ctx.save_for_backward(grad)
        ctx.dtype, ctx.n_args = logits.dtype, len(args)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        out = None
        if ctx.needs_input_grad[0]:
            # Always multiply on device: testing grad_output == 1 would need a host sync.
            out = torch.empty(grad.shape, dtype=ctx.dtype, device=grad.device)
            torch.mul(grad, g, out=out)
        return (out, None) + (None,) * ctx.n_args


def row_loss(kernel, logits, teacher_logits, target, *scalars):
    """Launch a one-program-per-row loss kernel; returns (loss, fp32 gradient)."""
    zs, zt = logits.contiguous(), teacher_logits.contiguous()
    B, C = zs.shape
    dz = torch.empty((B, C), dtype=torch.float32, device=zs.device)
    partials = torch.empty((B,), dtype=torch.float32, device=zs.device)
    block = next_pow2(C)
    kernel[(B,)](zs, zt, target.contiguous(), dz, partials, C, *scalars, BLOCK=block, num_warps=row_num_warps(block))
    return partials.sum(), dz


def _dkd_run(zs, zt, y, alpha, beta, T):
    B = zs.shape[0]
    return row_loss(_dkd_row_kernel, zs, zt, y, 1.0 / T, float(T), alpha / B, beta / B)


def _ofa_run(zs, zt, y, eps, T):
    return row_loss(_ofa_row_kernel, zs, zt, y, 1.0 / T, float(eps), 1.0 / zs.shape[0])


def _eager_instead(logits):
    return logits.dtype == torch.float64 or logits.shape[0] == 0


def dkd_loss_triton(student_logits, teacher_logits, target, alpha, beta, temperature):
    if _eager_instead(student_logits):
        return ref.dkd_loss_eager(student_logits, teacher_logits, target, alpha, beta, temperature)
    return FusedLoss.apply(student_logits, _dkd_run, teacher_logits, target, float(alpha), float(beta),
                           float(temperature))


def ofa_loss_triton(logits, teacher_logits, target, eps, temperature):
    if _eager_instead(logits):
        return ref.ofa_loss_eager(logits, teacher_logits, target, eps, temperature)
    return FusedLoss.apply(logits, _ofa_run, teacher_logits, target, float(eps), float(temperature))


def dist_loss_triton(student_logits, teacher_logits, beta, gamma, temperature):
    if _eager_instead(student_logits):
        return ref.dist_loss_eager(student_logits, teacher_logits, beta, gamma, temperature)
    from hcd.kernels.baselines_dist import dist_run
    return FusedLoss.apply(student_logits, dist_run, teacher_logits, float(beta), float(gamma), float(temperature))
