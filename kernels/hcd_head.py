"""Fused HCD head for one stage: CFM projection + SDD split/fusion + sub-logit CE/KL + orthogonality loss.

Launch plan (B rows, C classes, n sub-logits, N = n*C, D = Dp + Dt, e = activation bytes, w = weight bytes):
  forward
    1. _gemm_kernel     Z = x_s W[:, :Dp]^T + x_t W[:, Dp:]^T + b: two K ranges accumulated in one fp32
                        accumulator (no concatenation), Z stored fp32.      2*B*N*D FLOPs,
                        B*D*e + N*D*w + N*w + 4*B*N bytes.
    2. _head_row_kernel one program per row, all fp32: for each group j the fused Z~_j = a_s Z_j + a_t z_t,
                        its CE (label smoothing) and KL (temperature) statistics, the norm of the
                        masked group and its dot products with the earlier groups (reloaded from Z, which
                        sits in L2) -> the n x n Gram; then a second loop (reloading the groups of the
                        active OL pairs for the Gram gradient) writes dZ = a_s dL/dZ~ (fp32, per sample), the
                        fp32 dz_s (and dz_t = a_t sum_j dL/dZ~_j), and per-row loss partials.
                        ~60*B*N + 2*B*n*N FLOPs; compulsory bytes 4*B*N + 2*B*C*e + 8*B read,
                        4*B*N + 4*B*C (x2 with teacher grad) + 16*B written (group reloads hit L2).
    3. partials.sum(0)  (B, 4) -> (ce, kl, ol, total), four 0-dim outputs of one reduction.  16*B bytes.
                        No atomics, no host sync.
  backward (quack's deferral: dZ is saved, so the grad_output scale rides in the GEMM epilogues, a frozen
            weight costs nothing and a forward without backward never pays for the GEMMs)
    4. _gemm_kernel     dX = g * dZ W -> one (B, D) buffer, dx_s and dx_t its column views ((B, Dp) when
                        x_t is frozen, as in training: the teacher half of W is then never read).
                        2*B*N*D FLOPs, 4*B*N + N*D*w + B*D*e bytes.        (only if x_s or x_t need grad)
    5. _gemm_kernel     dW = g * dZ^T [x_s | x_t] (the two column ranges picked per tile) with fp32
                        accumulation, db = g * colsum(dZ) from the same tiles.   2*N*B*D FLOPs,
                        4*B*N + B*D*e + N*D*w + N*w bytes.                  (only if W or b need grad)
    6. torch.mul        (dz_s[, dz_t]) * g, rounded once into the logits dtype.  B*C*(4+e) bytes (x2).
  Six launches per stage and step in all: four heavy ones (1, 2, 4, 5: the design's "at most 4") and two
  tiny ones (3: a (B, 4) reduction instead of atomics on one scalar; 6: an elementwise scale).
  GEMM tiles are fixed per shape (_tile), not autotuned: no benchmarking inside a step or a graph capture.

Why Triton GEMMs and not torch.addmm/mm: Z must come out in fp32 from 16-bit inputs (a 16-bit Z would
round the logits before the softmax), dW must accumulate and land in fp32 for a float32 weight with
16-bit activations, the K ranges / column ranges must be read from x_s and x_t without a concatenation,
and grad_output must scale the result without an extra pass; torch.mm can do none of these without
extra launches and copies. The problem sizes (B <= 1024, N <= ~8000, D <= ~2000) are small, so a plain
tiled Triton GEMM should be close to cuBLAS here; that is an expectation, to be measured by the bench
issue (this file was written and checked without a GPU: interpreter tests + an offline sm_90 compile).

GEMM operands: forward, the activation dtype (a float32 weight is rounded to it in-kernel, as autocast
would); backward, the fp32 dZ against 16-bit x / W as TF32 dots (exact for fp16/bf16 operands; dZ is
rounded to TF32 only). Accumulation always fp32. For float32 activations the dots honour torch's own
fp32 matmul precision (IEEE by default) like torch.mm does. float64 inputs run the float64 eager
reference instead: float64 is a debugging dtype and the kernels are fp32 inside.
"""
import functools

import torch
import triton
import triton.language as tl

from hcd.kernels import reference
from hcd.kernels.launch import cdiv, next_pow2, row_num_warps
from hcd.kernels.student import smoothed_ce, softmax_stats

_NORM_EPS = tl.constexpr(1e-12)  # F.normalize's eps (a constexpr: jit code may read it)


# ---------------------------------------------------------------------------------------------------
# GEMM: C[M, N1+N2] = scale * (A1 B1 (+ A2 B2 over a second K range)) (+ bias), fp32 accumulation.
# K split (forward Z): A = [x_s | x_t] along K, B1/B2 = the matching column blocks of W^T.
# N split (dW): output columns [0, N1) use B1 (x_s), [N1, N1+N2) use B2 (x_t); tiles never straddle.

@triton.jit
def _accumulate(acc, a_ptr, b_ptr, rm, rn, M, N, K, sam, sak, sbk, sbn, colsum,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, COLSUM: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * sam + rk[None, :] * sak
    b_ptrs = b_ptr + rk[:, None] * sbk + rn[None, :] * sbn
    for k0 in range(0, K, BK):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        if COLSUM:  # row sums of A (= column sums of dZ for db), from the tile already in registers
            colsum += tl.sum(a.to(tl.float32), axis=1)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        a_ptrs += BK * sak
        b_ptrs += BK * sbk
    return acc, colsum


@triton.jit
def _gemm_kernel(a1_ptr, a2_ptr, b1_ptr, b2_ptr, c_ptr, bias_ptr, scale_ptr, colsum_ptr,
                 M, N1, N2, K1, K2, alpha,
                 sa1m, sa1k, sa2m, sa2k, sb1k, sb1n, sb2k, sb2n, scm, scn,
                 SPLIT_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                 COLSUM: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)  # int32 offsets: _gemm checks every operand has < 2^31 elements
    tiles_1 = tl.cdiv(N1, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    colsum = tl.zeros((BM,), dtype=tl.float32)
    if SPLIT_N and pid_n >= tiles_1:
        # second column range: B2 (x_t), output columns start at N1
        rn = (pid_n - tiles_1) * BN + tl.arange(0, BN)
        acc, colsum = _accumulate(acc, a1_ptr, b2_ptr, rm, rn, M, N2, K1, sa1m, sa1k, sb2k, sb2n, colsum,
                                  DOT_DTYPE, PRECISION, False, BM, BN, BK)
        out_n = rn + N1
        n_ok = rn < N2
    else:
        rn = pid_n * BN + tl.arange(0, BN)
        acc, colsum = _accumulate(acc, a1_ptr, b1_ptr, rm, rn, M, N1, K1, sa1m, sa1k, sb1k, sb1n, colsum,
                                  DOT_DTYPE, PRECISION, COLSUM, BM, BN, BK)
        if not SPLIT_N:  # second K range (K2 may be 0): same output tile, A2 against B2
            acc, colsum = _accumulate(acc, a2_ptr, b2_ptr, rm, rn, M, N1, K2, sa2m, sa2k, sb2k, sb2n, colsum,
                                      DOT_DTYPE, PRECISION, False, BM, BN, BK)
        out_n = rn
        n_ok = rn < N1
    if HAS_SCALE:  # alpha * grad_output, the latter read on device (no host sync)
        s = tl.load(scale_ptr).to(tl.float32) * alpha
        acc = acc * s
        colsum = colsum * s
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * scm + out_n[None, :] * scn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & n_ok[None, :])
    if COLSUM:
        if pid_n == 0:
            tl.store(colsum_ptr + rm, colsum.to(colsum_ptr.dtype.element_ty), mask=rm < M)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _gemm(out, a1, b1, *, a2=None, b2=None, split_n=False, bias=None, scale=None, alpha=1.0, colsum=None,
          dot_dtype=torch.float32, force_tf32=False, tile=None):
    """out = alpha * scale * (a1 @ b1 [+ a2 @ b2]) + bias, or with split_n: out = [a1 @ b1 | a1 @ b2].

    Operands are 2-D views with any strides (transposes are free). colsum receives scale * a1.sum(1).
    tile = (BM, BN, BK, num_warps, num_stages) overrides the per-shape choice (bench/tile_sweep.py).
    """
    M, K1 = a1.shape
    N1 = b1.shape[1]
    # The kernel indexes with int32 (64-bit pointer tiles double its register use); shapes only, no sync.
    if max(t.numel() for t in (a1, b1, out) + tuple(x for x in (a2, b2) if x is not None)) >= 2 ** 31:
        raise ValueError("hcd_head: an operand has >= 2^31 elements, beyond the fused GEMM's int32 indexing")
    if split_n:
        N2, K2 = b2.shape[1], 0
        a2 = a1
    else:
        N2 = 0
        K2 = a2.shape[1] if a2 is not None else 0
        a2 = a2 if a2 is not None else a1
        b2 = b2 if b2 is not None else b1
    if dot_dtype == torch.float32:
        precision = "tf32" if (out.is_cuda and (force_tf32 or _tf32_allowed())) else "ieee"
    else:
        precision = "tf32"  # ignored for 16-bit operands
    BM, BN, BK, warps, stages = tile or (*_tile(M, N1, N2, dot_dtype), _STAGES)
    grid = (cdiv(M, BM), cdiv(N1, BN) + cdiv(N2, BN))
    dummy = out  # placeholder pointer for absent optional operands (never read)
    _gemm_kernel[grid](
        a1, a2, b1, b2, out, bias if bias is not None else dummy, scale if scale is not None else dummy,
        colsum if colsum is not None else dummy,
        M, N1, N2, K1, K2, float(alpha),
        a1.stride(0), a1.stride(1), a2.stride(0), a2.stride(1),
        b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1), out.stride(0), out.stride(1),
        SPLIT_N=split_n, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, COLSUM=colsum is not None,
        DOT_DTYPE=_TL_DTYPE[dot_dtype], PRECISION=precision, BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    return out


def _tf32_allowed() -> bool:
    """torch.mm's own fp32 setting. Newer torch has fp32_precision ("tf32" | "ieee" | "none"), and reading the
    legacy allow_tf32 flag raises once someone has set the new one; older torch has only allow_tf32."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


# (BM, BN, BK, warps), largest first. No autotuning: its first-call benchmarking would run inside a
# training step (and inside CUDA-graph capture); these shapes are few and similar.
_TILES_16 = ((64, 128, 64, 8), (64, 64, 64, 4), (32, 64, 64, 4))
_STAGES = 3
_TILES_32 = ((64, 64, 32, 4), (32, 64, 32, 4))


@functools.lru_cache(maxsize=None)
def _tile(M, N1, N2, dot_dtype):
    """The largest tile that still gives ~one CTA per SM of an H100 (132 SMs); dX (M = B, N = D, K = nC
    long) would otherwise run 48 CTAs at ImageNet size."""
    tiles = _TILES_32 if dot_dtype == torch.float32 else _TILES_16
    for BM, BN, BK, warps in tiles:
        if cdiv(M, BM) * (cdiv(N1, BN) + cdiv(N2, BN)) >= 96:
            return BM, BN, BK, warps
    return tiles[-1]


# ---------------------------------------------------------------------------------------------------
# Row kernel: losses and dL/dZ of one sample, one sub-logit group (BLOCK_C wide) in registers at a time.

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
def _head_row_kernel(z_ptr, zt_ptr, zs_ptr, y_ptr, dz_ptr, dzl_ptr, loss_ptr,
                     B, C, n, alpha_s, alpha_t, eps, inv_T, T, theta,
                     w_ce, w_kl, w_ol, ce_weight, kl_weight, ol_weight, inv_bn, inv_b_pairs, inv_B,
                     KL_TARGET_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, WRITE_DZ: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    # w_ce = ce_weight/n, w_kl = kl_weight/n, w_ol = ol_weight/(n (n-1)) (0 when n = 1): per-SAMPLE weights.
    # dZ is stored B times the true gradient (1/B rides in the backward GEMMs' scale), so a 16-bit dZ is not
    # pushed into fp16's subnormal range at large B; the fp32 logits gradients take inv_B = 1/B here.
    # inv_bn = 1/(B n), inv_b_pairs = 1/(B max(n (n-1), 1)): the batch-means as per-row factors.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    idx = tl.arange(0, BLOCK_N)
    zrow = row * C * n
    lrow = row * C
    zt = tl.load(zt_ptr + lrow + offs, mask=mask, other=0.0).to(tl.float32)
    zs = tl.load(zs_ptr + lrow + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row)
    valid = (y >= 0) & (y < C)  # an out-of-range label (CUDA only) is clamped; its CE becomes NaN
    is_y = offs == tl.minimum(tl.maximum(y, 0), C - 1)

    # The learner of every KL: log q = zs/T - m_q - log s_q (kept as its two parts for exact offsets).
    a_s = zs * inv_T
    m_q, e_q, s_q, log_s_q = softmax_stats(a_s, mask)
    q = e_q / s_q
    shifted_q = a_s - m_q  # log q = shifted_q - log_s_q

    # ---- pass 1: per-group statistics in small register vectors (index = group) ----
    # log-sum-exps kept as (max, log of the shifted sum): f - m is exact for large common offsets, where
    # f - lse would lose the offset's rounding (6e-5 at 1e3 in fp32) in every softmax value.
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

    # ---- orthogonality: G = cosines, r = relu(G - theta) off the diagonal ----
    nrm_c = tl.maximum(nrm_v, _NORM_EPS)
    gram = dots / (nrm_c[:, None] * nrm_c[None, :])
    off = (idx[:, None] != idx[None, :]) & (idx[:, None] < n) & (idx[None, :] < n)
    r = tl.where(off, tl.maximum(gram - theta, 0.0), 0.0)
    ol_sum = tl.sum(tl.sum(r * r, axis=1), axis=0)
    # d total / d u_p = sum_q h_pq u_q with h = 4 r w_ol (G symmetric: both (p,q) and (q,p) count).
    h = 4.0 * w_ol * r
    h_dot_g = tl.sum(h * gram, axis=1)  # u_p . (d total / d u_p)

    # ---- pass 2: gradients, one group at a time ----
    sum_p = tl.zeros((BLOCK_C,), tl.float32)
    sum_g = tl.zeros((BLOCK_C,), tl.float32)
    ce_scale = tl.where(valid, w_ce, 0.0)
    for j in range(n):
        f = _fused_group(z_ptr, zrow, j, C, offs, mask, zt, alpha_s, alpha_t)
        f = tl.where(mask, f, _pick(m1_v, idx, j))  # a benign tail: no exp overflow (masked on store)
        softmax = tl.exp((f - _pick(m1_v, idx, j)) - _pick(ls1_v, idx, j))
        g = ce_scale * (softmax - (1.0 - eps) * is_y.to(tl.float32) - eps / C)
        logp = (f * inv_T - _pick(m2_v, idx, j)) - _pick(ls2_v, idx, j)
        p = tl.exp(logp)
        sum_p += tl.where(mask, p, 0.0)
        if KL_TARGET_GRAD:  # d(T^2 KL)/dZ~ = T p (log p - log q - KL)
            log_ratio = (f * inv_T - _pick(m2_v, idx, j)) - shifted_q + (log_s_q - _pick(ls2_v, idx, j))
            g += (w_kl * T) * p * (log_ratio - _pick(kl_v, idx, j))
        # orthogonality: dv = (du - u (u.du)) / ||v|| (F.normalize; du/eps below eps), 0 at y
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
        dv = tl.where(nrm >= _NORM_EPS, (du - v * (_pick(h_dot_g, idx, j) / nrm_cj)) / nrm_cj, du / _NORM_EPS)
        g += tl.where(is_y, 0.0, dv)
        g = tl.where(mask, g, 0.0)
        if WRITE_DZ:
            tl.store(dz_ptr + zrow + j * C + offs, (alpha_s * g).to(dz_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            sum_g += g

    # student logits: the learner side of the n KLs, d/dz_s = T (n q - sum_j p_j) w_kl
    tl.store(dzl_ptr + lrow + offs, (w_kl * T * inv_B) * (n * q - sum_p), mask=mask)
    if TEACHER_GRAD:
        tl.store(dzl_ptr + B * C + lrow + offs, (alpha_t * inv_B) * sum_g, mask=mask)

    ce_row = tl.where(valid, tl.sum(ce_v, axis=0), float("nan"))
    kl_row = T * T * tl.sum(kl_v, axis=0)
    ce_part = ce_row * inv_bn
    kl_part = kl_row * inv_bn
    ol_part = ol_sum * inv_b_pairs
    tl.store(loss_ptr + row * 4 + 0, ce_part)
    tl.store(loss_ptr + row * 4 + 1, kl_part)
    tl.store(loss_ptr + row * 4 + 2, ol_part)
    tl.store(loss_ptr + row * 4 + 3, ce_weight * ce_part + kl_weight * kl_part + ol_weight * ol_part)


# ---------------------------------------------------------------------------------------------------

def _row_launch(z, z_t, z_s, target, dz, dzl, partials, cfg, *, teacher_grad, write_dz, num_warps=None):
    """Launch 2 of the plan: one program per row over Z (B, n*C) fp32; num_warps overrides the choice
    (bench/tile_sweep.py)."""
    B, C = z_t.shape
    n = cfg.n_sublogits
    block_c = next_pow2(C)
    _head_row_kernel[(B,)](
        z, z_t, z_s, target, dz, dzl, partials,
        B, C, n, float(cfg.student_scale), float(cfg.teacher_scale), float(cfg.label_smoothing),
        1.0 / cfg.temperature, float(cfg.temperature), float(cfg.ol_threshold),
        cfg.ce_weight / n, cfg.sublogit_kl_weight / n,
        cfg.ol_weight / (n * (n - 1)) if n > 1 else 0.0,
        float(cfg.ce_weight), float(cfg.sublogit_kl_weight), float(cfg.ol_weight),
        1.0 / (B * n), 1.0 / (B * max(n * (n - 1), 1)), 1.0 / B,
        KL_TARGET_GRAD=not cfg.detach_sublogit_target, TEACHER_GRAD=teacher_grad, WRITE_DZ=write_dz,
        BLOCK_C=block_c, BLOCK_N=max(next_pow2(n), 2), num_warps=num_warps or row_num_warps(2 * block_c))


def _backward_dot(act):
    """GEMM operands of the backward: the fp32 dZ against 16-bit x / W as TF32 dots. fp16 and bf16 values
    are exact in TF32 (10-bit mantissa, 8-bit exponent), so the only rounding is dZ's to TF32 (2^-11
    relative, 8x finer than bf16) at half the bf16 tensor-core rate. fp32 activations follow torch.mm's
    own TF32 setting (IEEE by default)."""
    return dict(dot_dtype=torch.float32, force_tf32=act in (torch.float16, torch.bfloat16))


class _HCDHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_s, x_t, weight, bias, z_t, z_s, target, cfg):
        x_s, x_t, weight, z_t, z_s, target = (t.contiguous() for t in (x_s, x_t, weight, z_t, z_s, target))
        bias = bias.contiguous() if bias is not None else None
        B, Dp = x_s.shape
        C = z_t.shape[1]
        n = cfg.n_sublogits
        dev, act = x_s.device, x_s.dtype
        need = ctx.needs_input_grad
        need_dz = any(need[:4])

        # 1. Z in fp32, the two K ranges accumulated in one tile loop.
        z = torch.empty((B, n * C), dtype=torch.float32, device=dev)
        _gemm(z, x_s, weight[:, :Dp].t(), a2=x_t, b2=weight[:, Dp:].t(), bias=bias, dot_dtype=act)

        # 2. the row kernel: losses and all dL/dZ, dL/dz_s, dL/dz_t (unscaled by grad_output).
        # dZ stays fp32 whatever the activation dtype: rounding it to bf16 for the backward GEMMs cost up to
        # 3.6 % of max|dW| at the ImageNet shape on an H200 (beyond the tolerance rule); see _backward_dot.
        dz = torch.empty((B, n * C), dtype=torch.float32, device=dev) if need_dz else z
        dzl = torch.empty((2 if need[4] else 1, B, C), dtype=torch.float32, device=dev)
        partials = torch.empty((B, 4), dtype=torch.float32, device=dev)
        _row_launch(z, z_t, z_s, target, dz, dzl, partials, cfg, teacher_grad=bool(need[4]), write_dz=need_dz)

        ctx.save_for_backward(x_s, x_t, weight, dz if need_dz else None, dzl)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.act = act
        # 3. (ce, kl, ol, total) in one reduction, handed out as four outputs: the parts are marked
        # non-differentiable and grads are not materialised, so the backward gets total's gradient as is
        # (indexing one (4,) output would add a select-backward's zero-fill and copy launches per step).
        ce, kl, ol, total = partials.sum(0).unbind(0)
        ctx.mark_non_differentiable(ce, kl, ol)
        ctx.set_materialize_grads(False)
        return total, ce, kl, ol

    @staticmethod
    def backward(ctx, g, *_parts):
        x_s, x_t, weight, dz, dzl = ctx.saved_tensors
        need = ctx.needs_input_grad
        if g is None:  # only total carries a gradient; nothing reached it
            return (None,) * 8
        # g = d out / d total, a 0-dim tensor read on the device (no host sync)
        act, Dp = ctx.act, x_s.shape[1]
        dx_s = dx_t = dw = db = dzt = dzs = None
        inv_b = 1.0 / x_s.shape[0]  # dZ was stored per sample (see the row kernel)
        if need[0] or need[1]:  # 4. dX = g dZ W; both column ranges in one launch only when both are wanted
            cols = slice(0, weight.shape[1]) if need[1] else slice(0, Dp)  # x_teacher is frozen in training
            dx = torch.empty((x_s.shape[0], cols.stop), dtype=act, device=x_s.device)
            _gemm(dx, dz, weight[:, cols], scale=g, alpha=inv_b, **_backward_dot(act))
            dx_s = dx[:, :Dp] if need[0] else None
            dx_t = dx[:, Dp:] if need[1] else None
        if need[2]:  # 5. dW = g dZ^T [x_s | x_t] (+ db from the same tiles)
            dw = torch.empty_like(weight)
            db = torch.empty((weight.shape[0],), dtype=ctx.bias_dtype, device=dz.device) if need[3] else None
            _gemm(dw, dz.t(), x_s, b2=x_t, split_n=True, scale=g, alpha=inv_b, colsum=db, **_backward_dot(act))
        elif need[3]:  # trainable bias with a frozen weight: no GEMM needed
            db = (dz.float().sum(0) * (g * inv_b)).to(ctx.bias_dtype)
        if need[4] or need[5]:  # 6. logits gradients, scaled and rounded once
            out = torch.empty(dzl.shape, dtype=act, device=dzl.device)
            torch.mul(dzl, g, out=out)
            dzs = out[0] if need[5] else None
            dzt = out[1] if need[4] else None
        return dx_s, dx_t, dw, db, dzt, dzs, None, None


def hcd_head_loss_triton(x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg):
    """(total, ce, kl, ol) of one stage; total carries the graph, ce/kl/ol are detached and unweighted."""
    args = (x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg)
    if x_student.dtype == torch.float64 or x_student.shape[0] == 0:
        return reference.hcd_head_loss_eager(*args)
    return _HCDHead.apply(*args)
