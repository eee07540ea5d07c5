"""Triton row helpers shared by the fused heads (kernels/hcd_head.py, kernels/student.py, kernels/baselines.py):
softmax statistics, label-smoothed CE and the non-target mass of one masked fp32 row held in registers, and
accurate log1p / expm1."""
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
