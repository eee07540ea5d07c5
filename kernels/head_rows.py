"""The per-row math of one HCD head, shared by the per-stage kernel (kernels/hcd_head.py) and the one-call
loss (kernels/hcd_step.py): for one sample and one stage, the fused sub-logits' CE (label smoothing), KL
against the student (temperature) and orthogonality loss, and every dL/dZ, all fp32, one sub-logit group
(BLOCK_C wide) in registers at a time. Groups are reloaded from Z (L2-resident) instead of held: n groups
of C floats would not fit in registers at C = 1000.
"""
import triton
import triton.language as tl

from hcd.kernels._common import ce_grad, smoothed_ce, smoothed_soft_ce, softmax_stats

_NORM_EPS = tl.constexpr(1e-12)  # F.normalize's eps (a constexpr: jit code may read it)


@triton.jit
def _fused_group(z_ptr, zrow, j, C, offs, mask, zt, alpha_s, alpha_t):
    """Z~_j = a_s Z_j + a_t z_t for one row, fp32; 0 in the masked tail."""
    z = tl.load(z_ptr + zrow + j * C + offs, mask=mask, other=0.0)
    return alpha_s * z + alpha_t * zt


@triton.jit
def _pick(vec, idx, j):
    """vec[j] of a small register vector (BLOCK_N wide), as a scalar."""
    return tl.sum(tl.where(idx == j, vec, 0.0), axis=0)


@triton.jit
def _group_stats(z_ptr, zrow, n, C, offs, mask, idx, zt, is_y, t, sum_t, alpha_s, alpha_t, eps, inv_T, shifted_q,
                 log_s_q, SOFT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 1: per-group statistics in small register vectors (index = group), and the dot products of the
    masked groups (the Gram's numerators).

    Log-sum-exps are kept as (max, log of the shifted sum): f - m is exact for large common offsets, where
    f - lse would lose the offset's rounding (6e-5 at 1e3 in fp32) in every softmax value.
    """
    m1_v = tl.zeros((BLOCK_N,), tl.float32)     # max of Z~_j
    ls1_v = tl.zeros((BLOCK_N,), tl.float32)    # log sum exp(Z~_j - max)
    m2_v = tl.zeros((BLOCK_N,), tl.float32)     # the same for Z~_j / T
    ls2_v = tl.zeros((BLOCK_N,), tl.float32)
    kl_v = tl.zeros((BLOCK_N,), tl.float32)     # sum_c p (log p - log q), without T^2
    ce_v = tl.zeros((BLOCK_N,), tl.float32)
    nrm_v = tl.zeros((BLOCK_N,), tl.float32)    # ||mask_y(Z~_j)||
    dots = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    for j in range(n):
        f = _fused_group(z_ptr, zrow, j, C, offs, mask, zt, alpha_s, alpha_t)
        if SOFT:
            ce, m1, _e1, _s1, log_s1 = smoothed_soft_ce(f, mask, t, sum_t, eps, C)
        else:
            ce, m1, _e1, _s1, log_s1 = smoothed_ce(f, mask, is_y, eps, C)
        ce_v = tl.where(idx == j, ce, ce_v)
        m1_v = tl.where(idx == j, m1, m1_v)
        ls1_v = tl.where(idx == j, log_s1, ls1_v)

        a = f * inv_T
        m2, e2, s2, log_s2 = softmax_stats(a, mask)
        log_ratio = (a - m2) - shifted_q + (log_s_q - log_s2)  # log p - log q
        kl = tl.sum(tl.where(mask, (e2 / s2) * log_ratio, 0.0), axis=0)
        kl_v = tl.where(idx == j, kl, kl_v)
        m2_v = tl.where(idx == j, m2, m2_v)
        ls2_v = tl.where(idx == j, log_s2, ls2_v)

        v = tl.where(mask & ~is_y, f, 0.0)  # zero-mask the ground-truth class
        nrm_v = tl.where(idx == j, tl.sqrt(tl.sum(v * v, axis=0)), nrm_v)
        for k in range(0, j):  # dots with the earlier groups, reloaded (L2-resident)
            vk = tl.where(mask & ~is_y, _fused_group(z_ptr, zrow, k, C, offs, mask, zt, alpha_s, alpha_t), 0.0)
            d = tl.sum(v * vk, axis=0)
            pair = ((idx[:, None] == j) & (idx[None, :] == k)) | ((idx[:, None] == k) & (idx[None, :] == j))
            dots = tl.where(pair, d, dots)
    return ce_v, m1_v, ls1_v, m2_v, ls2_v, kl_v, nrm_v, dots


@triton.jit
def _orthogonality(nrm_v, dots, idx, n, theta, w_ol):
    """G = cosines, r = relu(G - theta) off the diagonal. Returns the clamped norms, the row's sum of r^2,
    h with d total / d u_p = sum_q h_pq u_q, and u_p . (d total / d u_p) per group."""
    nrm_c = tl.maximum(nrm_v, _NORM_EPS)
    gram = dots / (nrm_c[:, None] * nrm_c[None, :])
    off = (idx[:, None] != idx[None, :]) & (idx[:, None] < n) & (idx[None, :] < n)
    r = tl.where(off, tl.maximum(gram - theta, 0.0), 0.0)
    ol_sum = tl.sum(tl.sum(r * r, axis=1), axis=0)
    # h = 4 r w_ol (G symmetric: both (p,q) and (q,p) count).
    h = 4.0 * w_ol * r
    h_dot_g = tl.sum(h * gram, axis=1)  # u_p . (d total / d u_p)
    return nrm_c, ol_sum, h, h_dot_g


@triton.jit
def _ol_grad(z_ptr, zrow, j, n, C, offs, mask, idx, zt, is_y, alpha_s, alpha_t, f, h, h_dot_g, nrm_v, nrm_c,
             BLOCK_C: tl.constexpr):
    """d total / d mask_y(Z~_j) of the orthogonality loss: dv = (du - u (u.du)) / ||v|| (F.normalize;
    du/eps below eps), reloading only the groups of active pairs."""
    h_j = tl.sum(tl.where(idx[:, None] == j, h, 0.0), axis=0)
    du = tl.zeros((BLOCK_C,), tl.float32)
    for k in range(n):
        h_jk = _pick(h_j, idx, k)
        if h_jk != 0.0:  # inactive pairs (relu = 0) cost nothing
            vk = tl.where(mask & ~is_y, _fused_group(z_ptr, zrow, k, C, offs, mask, zt, alpha_s, alpha_t), 0.0)
            du += (h_jk / _pick(nrm_c, idx, k)) * vk
    v = tl.where(mask & ~is_y, f, 0.0)
    nrm = _pick(nrm_v, idx, j)
    nrm_cj = tl.maximum(nrm, _NORM_EPS)
    return tl.where(nrm >= _NORM_EPS, (du - v * (_pick(h_dot_g, idx, j) / nrm_cj)) / nrm_cj, du / _NORM_EPS)




@triton.jit
def head_row_terms(z_ptr, dz_ptr, zrow, zt, zs, is_y, valid, t, sum_t, n, C, offs, mask,
                   alpha_s, alpha_t, eps, inv_T, T, theta, w_ce, w_kl, w_ol, inv_B,
                   KL_TARGET_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, WRITE_DZ: tl.constexpr,
                   SOFT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """One sample of one head, Z's row at z_ptr + zrow: (ce_row, kl_row, ol_sum, dzs, sum_g).

    is_y marks the label (soft targets: argmax(t)); with SOFT the CE takes the soft target row t (fp32, sum
    sum_t; kernels/_common.py: row_soft_target), otherwise t and sum_t are unused placeholders.
    ce_row, kl_row: the sums over the n groups of CE and T^2 KL (NaN CE for an invalid label); ol_sum: the
    row's sum of relu(G - theta)^2. dZ (= alpha_s dL/dZ~, per-sample weights w_*) goes to dz_ptr + zrow when
    WRITE_DZ; dzs = dL/dz_s at the true scale (inv_B = 1/B); sum_g = sum_j dL/dZ~_j (per sample) when
    TEACHER_GRAD, for the teacher logits."""
    idx = tl.arange(0, BLOCK_N)
    # The learner of every KL: log q = zs/T - m_q - log s_q (kept as its two parts for exact offsets).
    a_s = zs * inv_T
    m_q, e_q, s_q, log_s_q = softmax_stats(a_s, mask)
    q = e_q / s_q
    shifted_q = a_s - m_q  # log q = shifted_q - log_s_q

    ce_v, m1_v, ls1_v, m2_v, ls2_v, kl_v, nrm_v, dots = _group_stats(
        z_ptr, zrow, n, C, offs, mask, idx, zt, is_y, t, sum_t, alpha_s, alpha_t, eps, inv_T, shifted_q, log_s_q,
        SOFT, BLOCK_N)
    nrm_c, ol_sum, h, h_dot_g = _orthogonality(nrm_v, dots, idx, n, theta, w_ol)

    # ---- pass 2: gradients, one group at a time ----
    sum_p = tl.zeros((BLOCK_C,), tl.float32)
    sum_g = tl.zeros((BLOCK_C,), tl.float32)
    ce_scale = tl.where(valid, w_ce, 0.0)
    for j in range(n):
        f = _fused_group(z_ptr, zrow, j, C, offs, mask, zt, alpha_s, alpha_t)
        f = tl.where(mask, f, _pick(m1_v, idx, j))  # a benign tail: no exp overflow (masked on store)
        softmax = tl.exp((f - _pick(m1_v, idx, j)) - _pick(ls1_v, idx, j))
        g = ce_scale * ce_grad(softmax, is_y, t, sum_t, eps, C, SOFT)
        logp = (f * inv_T - _pick(m2_v, idx, j)) - _pick(ls2_v, idx, j)
        p = tl.exp(logp)
        sum_p += tl.where(mask, p, 0.0)
        if KL_TARGET_GRAD:  # d(T^2 KL)/dZ~ = T p (log p - log q - KL)
            log_ratio = (f * inv_T - _pick(m2_v, idx, j)) - shifted_q + (log_s_q - _pick(ls2_v, idx, j))
            g += (w_kl * T) * p * (log_ratio - _pick(kl_v, idx, j))
        dv = _ol_grad(z_ptr, zrow, j, n, C, offs, mask, idx, zt, is_y, alpha_s, alpha_t, f, h, h_dot_g, nrm_v,
                      nrm_c, BLOCK_C)
        g += tl.where(is_y, 0.0, dv)  # the ground-truth class is masked out of the orthogonality loss
        g = tl.where(mask, g, 0.0)
        if WRITE_DZ:
            tl.store(dz_ptr + zrow + j * C + offs, (alpha_s * g).to(dz_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            sum_g += g

    # student logits: the learner side of the n KLs, d/dz_s = T (n q - sum_j p_j) w_kl
    dzs = (w_kl * T * inv_B) * (n * q - sum_p)
    ce_row = tl.where(valid, tl.sum(ce_v, axis=0), float("nan"))
    kl_row = T * T * tl.sum(kl_v, axis=0)
    return ce_row, kl_row, ol_sum, dzs, sum_g
