"""Triton row helpers shared by the fused heads (kernels/hcd_head.py, kernels/student.py, kernels/baselines.py):
softmax statistics, label-smoothed CE (class labels or soft targets) and the non-target mass of one masked
fp32 row held in registers, and accurate log1p / expm1.

Soft targets (docs/method.md, Soft targets): the row kernels take a SOFT constexpr. False (labels) compiles
exactly the label code (row_label, smoothed_ce, the label branch of ce_grad); True reads a (B, C) target row
as fp32 (row_soft_target) and uses smoothed_soft_ce and the soft branch of ce_grad, with is_y the one-hot
of argmax(t) for the orthogonality mask."""
import triton
import triton.language as tl


@triton.jit
def softmax_stats(x, mask):
    """(m, e, s, log_s) of a masked fp32 row: m = max, e = exp(x - m) (0 off the mask), s = sum e.

    log_s is computed as log1p of the sum WITHOUT the max element(s): in a confident row (p_max -> 1)
    the other terms are each below half an ulp of 1, so adding them to the 1 loses them in whatever
    order the reduction runs, and log(s) would round the loss -log p_max ~ 1e-7 to 0.
    """
    m = tl.max(tl.where(mask, x, -float("inf")), axis=0)
    e = tl.exp(tl.where(mask, x - m, -float("inf")))
    top = mask & (x == m)
    rest = tl.sum(tl.where(top, 0.0, e), axis=0) + (tl.sum(top.to(tl.float32), axis=0) - 1.0)
    return m, e, 1.0 + rest, log1p(rest)


@triton.jit
def log1p(x):
    """log(1 + x) accurate for small x (the u = 1 + x, log(u) * x / (u - 1) trick)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def expm1(x):
    """exp(x) - 1 accurate for small x (Kahan: (u - 1) * x / log(u), u = exp(x))."""
    u = tl.exp(x)
    d = u - 1.0
    return tl.where(d == 0.0, x, d * (x / tl.log(tl.where(d == 0.0, 2.0, u))))


@triton.jit
def other_mass(a, mask, is_y, m, log_s):
    """(q, log_b): q = the softmax of the masked row a over its non-target classes (0 at y and off the mask),
    log_b = log(1 - p_y) = lse_{c != y}(a) - lse(a), never rounded through 1 - p_y; (m, log_s) are the whole
    row's softmax_stats. Needs C >= 2 (the other classes are not empty)."""
    m_o, e_o, s_o, log_s_o = softmax_stats(a, mask & (is_y == 0))
    return e_o / s_o, (m_o - m) + (log_s_o - log_s)


@triton.jit
def smoothed_ce(x, mask, is_y, eps, C):
    """(ce, m, e, s, log_s) of one masked fp32 row: CE_eps = (1-eps)(lse - x_y) + eps * mean_c(lse - x_c),
    with lse - x_c written as log(s) + (m - x_c) so a large common offset cancels exactly instead of
    through lse. The softmax statistics come back for the gradient (softmax = e / s)."""
    m, e, s, log_s = softmax_stats(x, mask)
    nll = log_s + (m - tl.sum(tl.where(is_y, x, 0.0), axis=0))  # parenthesised: keep log_s
    smooth = log_s + tl.sum(tl.where(mask, m - x, 0.0), axis=0) / C
    return (1.0 - eps) * nll + eps * smooth, m, e, s, log_s


@triton.jit
def row_label(y_ptr, row, C, offs):
    """(valid, is_y) of one row's class label: an out-of-range label (unchecked on CUDA) never indexes
    memory; it is clamped into [0, C) and `valid` is False, so the caller can NaN the row's CE."""
    y = tl.load(y_ptr + row)
    valid = (y >= 0) & (y < C)
    is_y = offs == tl.minimum(tl.maximum(y, 0), C - 1)
    return valid, is_y


@triton.jit
def row_soft_target(t_ptr, row, C, offs, mask):
    """(valid, is_y, t, sum_t) of one row of a (B, C) soft target, read as fp32 whatever its dtype.

    valid is False for a row with a non-finite entry (unchecked on CUDA): the row is then read as zeros and
    the caller NaNs its CE, as for an out-of-range label (kernels/reference.py does the same). is_y marks
    argmax(t), ties to the FIRST maximal index (torch.argmax's rule, so every backend masks the same class).
    sum_t = sum_c t_c (1 for a proper distribution; not renormalised)."""
    t = tl.load(t_ptr + row * C + offs, mask=mask, other=0.0).to(tl.float32)
    valid = tl.sum(tl.where(mask, t - t, 0.0), axis=0) == 0.0  # t - t is NaN exactly at inf / NaN entries
    t = tl.where(valid, t, 0.0)  # (0 off the mask already)
    top = tl.max(tl.where(mask, t, -float("inf")), axis=0)
    y = tl.min(tl.where(mask & (t == top), offs, C), axis=0)
    return valid, offs == y, t, tl.sum(t, axis=0)


@triton.jit
def row_target(y_ptr, row, C, offs, mask, SOFT: tl.constexpr):
    """(valid, is_y, t, sum_t) of one row's target: SOFT, a (B, C) soft target row (row_soft_target); else a
    (B,) label (row_label), with t = onehot(y) and sum_t = 1, which the label code never reads."""
    if SOFT:
        valid, is_y, t, sum_t = row_soft_target(y_ptr, row, C, offs, mask)
    else:
        valid, is_y = row_label(y_ptr, row, C, offs)
        t = is_y.to(tl.float32)
        sum_t = 1.0
    return valid, is_y, t, sum_t


@triton.jit
def smoothed_soft_ce(x, mask, t, sum_t, eps, C):
    """(ce, m, e, s, log_s) as smoothed_ce for a soft target row t (fp32, 0 off the mask; sum_t its sum):
    CE = -sum_c t'_c log p_c, t' = (1-eps) t + eps/C, as (1-eps) sum_c t_c (lse - x_c) + eps mean_c(lse - x_c)
    with sum_c t_c (lse - x_c) = sum_t log(s) + sum_c t_c (m - x_c): exact for large offsets, and for a
    one-hot t the label path's value bit for bit (the zero terms add exactly 0)."""
    m, e, s, log_s = softmax_stats(x, mask)
    nll = sum_t * log_s + tl.sum(tl.where(mask, t * (m - x), 0.0), axis=0)
    smooth = log_s + tl.sum(tl.where(mask, m - x, 0.0), axis=0) / C
    return (1.0 - eps) * nll + eps * smooth, m, e, s, log_s


@triton.jit
def ce_grad(softmax, is_y, t, sum_t, eps, C, SOFT: tl.constexpr):
    """dCE_eps/dx of one row (unweighted). Labels: softmax - (1-eps) onehot(y) - eps/C. Soft: the gradient
    of -sum_c t'_c log p_c, softmax sum(t') - t' with sum(t') = 1 + (1-eps)(sum_t - 1): written so that the
    correction vanishes exactly for sum_t = 1 (a one-hot t then gives the label path's gradient bit for bit;
    a mixup row's rounding of sum_t stays in the gradient, as in the reference)."""
    if SOFT:
        g = softmax + ((1.0 - eps) * (sum_t - 1.0)) * softmax - (1.0 - eps) * t - eps / C
    else:
        g = softmax - (1.0 - eps) * is_y.to(tl.float32) - eps / C
    return g
