"""Fused DIST loss: T^2 (beta (1 - mean_b cos_b) + gamma (1 - mean_c cos_c)), cos = Pearson of softmax(z/T)
rows (b) and columns (c), eps = 1e-8 on the norm product (kernels/baselines_reference.py).

Each 1 -+ cos is computed as (nu nv |u/nu -+ v/nv|^2 / 2 + eps) / (nu nv + eps) (u, v the centred student and
teacher vectors, nu, nv their norms) and d cos / du = (nv / (nu nv + eps)) (v/nv - cos u/nu) as
((v/nv - u/nu) + (1 - cos) u/nu) near cos = 1, ((v/nv + u/nu) - (1 + cos) u/nu) near cos = -1: the same
numbers as the reference's u.v / (nu nv + eps), but nothing cancels when the student matches the teacher (the
loss and its gradient go to 0) or opposes it (every column at B = 2). A zero norm gives the zero subgradient,
as torch's norm does.

Launch plan (B rows, C classes, e = bytes per logit; fp32 workspace P = [p_s; p_t] (2*B*C) and dP (B*C)):
  1. _dist_row_kernel, one program per row: both softmaxes (stored to P), the row Pearson, its loss partial
     and d(beta T^2 (1 - cos_b) / B)/dp_s (centred over the row, as autograd's mean subtraction) into dP.
     2*B*C*e read, 12*B*C written.
  2. _dist_col_kernel, one program per BLOCK_C columns, looping over B in BLOCK_B-row tiles: four passes
     (column means; norms and the means' rounding residue; |u/nu -+ v/nv|^2; the gradient added into dP).
     Only this program touches its columns, so no atomics. ~36*B*C bytes.
  3. _dist_softmax_bwd_kernel, one program per row: dz = p_s (dP - <p_s, dP>) / T, written over dP (the
     saved gradient). 8*B*C read, 4*B*C written.
  4. partials.sum() over the B + C loss partials. Backward: kernels/baselines.py's FusedLoss (one multiply).
"""
import torch
import triton
import triton.language as tl

from hcd.kernels._common import softmax_stats
from hcd.kernels.baselines import _load_row
from hcd.kernels.baselines_reference import DIST_EPS
from hcd.kernels.launch import cdiv, next_pow2, row_num_warps

BLOCK_B, BLOCK_C = 64, 32  # the column kernel's tile


@triton.jit
def _pearson_terms(nu, nv, d2, s2, eps):
    """(1 - cos, 1 + cos, nv / N), N = nu nv + eps, from the norms, d2 = |u/nu - v/nv|^2, s2 = |u/nu + v/nv|^2."""
    n = nu * nv + eps
    return (0.5 * nu * nv * d2 + eps) / n, (0.5 * nu * nv * s2 + eps) / n, nv / n


@triton.jit
def _cos_grad(uh, vh, delta, sigma, k):
    """d cos / du = k (v/nv - cos u/nu), written around cos = +1 or -1, whichever is nearer, so it does not cancel."""
    return k * tl.where(delta <= sigma, (vh - uh) + delta * uh, (vh + uh) - sigma * uh)


@triton.jit
def _unit(x, norm):
    return x * tl.where(norm > 0.0, 1.0 / tl.where(norm > 0.0, norm, 1.0), 0.0)


@triton.jit
def _dist_row_kernel(zs_ptr, zt_ptr, p_ptr, dp_ptr, part_ptr, B, C, inv_T, w_row, eps, BLOCK: tl.constexpr):
    row, offs, mask, base, a_s, a_t = _load_row(zs_ptr, zt_ptr, C, inv_T, BLOCK)
    m_s, e_s, s_s, log_s_s = softmax_stats(a_s, mask)
    m_t, e_t, s_t, log_s_t = softmax_stats(a_t, mask)
    p_s = e_s / s_s
    p_t = e_t / s_t
    tl.store(p_ptr + base + offs, p_s, mask=mask)
    tl.store(p_ptr + B * C + base + offs, p_t, mask=mask)
    u = tl.where(mask, p_s - tl.sum(p_s, axis=0) / C, 0.0)
    v = tl.where(mask, p_t - tl.sum(p_t, axis=0) / C, 0.0)
    nu = tl.sqrt(tl.sum(u * u, axis=0))
    nv = tl.sqrt(tl.sum(v * v, axis=0))
    uh = _unit(u, nu)
    vh = _unit(v, nv)
    delta, sigma, k = _pearson_terms(nu, nv, tl.sum((uh - vh) * (uh - vh), axis=0),
                                     tl.sum((uh + vh) * (uh + vh), axis=0), eps)
    g = -w_row * _cos_grad(uh, vh, delta, sigma, k)  # d(w_row (1 - cos))/du
    g = tl.where(mask, g - tl.sum(g, axis=0) / C, 0.0)  # through u = p - mean(p)
    tl.store(dp_ptr + base + offs, g, mask=mask)
    tl.store(part_ptr + row, w_row * delta)


@triton.jit
def _col_tile(p_ptr, B, C, b0, cols, cmask, BB: tl.constexpr):
    """(offsets, mask, p_s tile, p_t tile) of rows [b0, b0 + BB) of this program's columns."""
    rows = b0 + tl.arange(0, BB)
    m2 = (rows < B)[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    ps = tl.load(p_ptr + offs, mask=m2, other=0.0)
    pt = tl.load(p_ptr + B * C + offs, mask=m2, other=0.0)
    return offs, m2, ps, pt


@triton.jit
def _dist_col_kernel(p_ptr, dp_ptr, part_ptr, B, C, w_col, eps, BB: tl.constexpr, BC: tl.constexpr):
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = cols < C
    sum_s = tl.zeros((BC,), dtype=tl.float32)
    sum_t = tl.zeros((BC,), dtype=tl.float32)
    for b0 in range(0, B, BB):
        offs, m2, ps, pt = _col_tile(p_ptr, B, C, b0, cols, cmask, BB)
        sum_s += tl.sum(ps, axis=0)
        sum_t += tl.sum(pt, axis=0)
    mean_s = sum_s / B
    mean_t = sum_t / B
    su = tl.zeros((BC,), dtype=tl.float32)
    sv = tl.zeros((BC,), dtype=tl.float32)
    ru = tl.zeros((BC,), dtype=tl.float32)
    rv = tl.zeros((BC,), dtype=tl.float32)
    for b0 in range(0, B, BB):
        offs, m2, ps, pt = _col_tile(p_ptr, B, C, b0, cols, cmask, BB)
        u = tl.where(m2, ps - mean_s[None, :], 0.0)
        v = tl.where(m2, pt - mean_t[None, :], 0.0)
        su += tl.sum(u * u, axis=0)
        sv += tl.sum(v * v, axis=0)
        ru += tl.sum(u, axis=0)
        rv += tl.sum(v, axis=0)
    # The means' rounding residue (ru / B) is subtracted from the centred values, not folded into the fp32
    # mean (which would round again): an error of u along (1, ..., 1) reaches the gradient amplified by 1/|u|
    # (B = 2: every column), and autograd's centring removes it from the reference's gradient.
    cu = ru / B
    cv = rv / B
    nu = tl.sqrt(tl.maximum(su - ru * cu, 0.0))
    nv = tl.sqrt(tl.maximum(sv - rv * cv, 0.0))
    d2 = tl.zeros((BC,), dtype=tl.float32)
    s2 = tl.zeros((BC,), dtype=tl.float32)
    for b0 in range(0, B, BB):
        offs, m2, ps, pt = _col_tile(p_ptr, B, C, b0, cols, cmask, BB)
        uh = _unit(tl.where(m2, (ps - mean_s[None, :]) - cu[None, :], 0.0), nu[None, :])
        vh = _unit(tl.where(m2, (pt - mean_t[None, :]) - cv[None, :], 0.0), nv[None, :])
        d2 += tl.sum((uh - vh) * (uh - vh), axis=0)
        s2 += tl.sum((uh + vh) * (uh + vh), axis=0)
    delta, sigma, k = _pearson_terms(nu, nv, d2, s2, eps)
    tl.store(part_ptr + cols, w_col * delta, mask=cmask)
    for b0 in range(0, B, BB):
        offs, m2, ps, pt = _col_tile(p_ptr, B, C, b0, cols, cmask, BB)
        uh = _unit(tl.where(m2, (ps - mean_s[None, :]) - cu[None, :], 0.0), nu[None, :])
        vh = _unit(tl.where(m2, (pt - mean_t[None, :]) - cv[None, :], 0.0), nv[None, :])
        g = -w_col * _cos_grad(uh, vh, delta[None, :], sigma[None, :], k[None, :])
        dp = tl.load(dp_ptr + offs, mask=m2, other=0.0)
        tl.store(dp_ptr + offs, dp + g, mask=m2)


@triton.jit
def _dist_softmax_bwd_kernel(p_ptr, dp_ptr, C, inv_T, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    base = row * C
    p = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
    g = tl.load(dp_ptr + base + offs, mask=mask, other=0.0)
    dz = (p * (g - tl.sum(p * g, axis=0))) * inv_T
    tl.store(dp_ptr + base + offs, dz, mask=mask)


def dist_run(student_logits, teacher_logits, beta, gamma, T):
    """(loss, fp32 d loss / d student_logits) of the three launches above."""
    zs, zt = student_logits.contiguous(), teacher_logits.contiguous()
    B, C = zs.shape
    p = torch.empty((2, B, C), dtype=torch.float32, device=zs.device)
    dz = torch.empty((B, C), dtype=torch.float32, device=zs.device)
    partials = torch.empty((B + C,), dtype=torch.float32, device=zs.device)
    block = next_pow2(C)
    warps = row_num_warps(block)
    _dist_row_kernel[(B,)](zs, zt, p, dz, partials, B, C, 1.0 / T, beta * T * T / B, DIST_EPS,
                           BLOCK=block, num_warps=warps)
    _dist_col_kernel[(cdiv(C, BLOCK_C),)](p, dz, partials[B:], B, C, gamma * T * T / C, DIST_EPS,
                                          BB=BLOCK_B, BC=BLOCK_C, num_warps=4)
    _dist_softmax_bwd_kernel[(B,)](p, dz, C, 1.0 / T, BLOCK=block, num_warps=warps)
    return partials.sum(), dz
