"""Eager PyTorch references of the baseline losses (docs/method.md, Baselines): DKD, DIST and OFA.

The numerics ground truth for kernels/baselines.py, as kernels/reference.py is for the HCD losses. All math
is float32 for 16-bit inputs (float64 stays float64); each loss is a 0-dim batch mean in that dtype.

What each follows, and where it deliberately differs from the reference code:
- DKD, megvii-research/mdistiller `mdistiller/distillers/DKD.py` `dkd_loss`: TCKD = T^2 KL(b_t || b_s) over
  the binary (target, non-target) probabilities, NCKD = T^2 KL over softmax(z/T - 1000*onehot), both summed
  and divided by B. The reference takes torch.log of the binary probabilities it summed from the softmax
  (no clamp): log(0) = -inf when the non-target mass underflows. Here log b = (log-sum-exp over the target,
  resp. the other classes) - log-sum-exp over all, which is the same number but finite whenever C >= 2
  (hence DKD needs C >= 2). The -1000 mask is kept literally (the target class keeps weight e^(-1000+...)).
- DIST, hunto/image_classification_sota `lib/models/losses/dist_kd.py` (and Hao840/OFAKD
  `distillers/dist.py`, which adds the temperature): T^2 (beta (1 - mean row Pearson) + gamma (1 - mean
  column Pearson)) of the softmaxes, Pearson = cosine of the centred vectors with 1e-8 added to the norm
  product, as there. Written the same way here (the fused kernel computes 1 - cos more accurately).
- OFA, Hao840/OFAKD `distillers/ofa.py` `ofa_loss`: mean_b -sum_c ((p_t + m)^eps - m)_c log p_s,c, no T^2.
  The reference takes torch.log(softmax) (-inf, then NaN, when p_s underflows); here log_softmax, and the
  target class weight (p_t,y + 1)^eps - 1 is expm1(eps log1p(p_t,y)) so a small p_t,y is not lost to the 1.
Out-of-range labels (possible only on CUDA, where they are not checked up front) give NaN rows.
"""
import torch

from hcd.kernels.reference import _safe_target, compute_dtype, kl_rows

DKD_MASK = 1000.0   # mdistiller's ground-truth mask for NCKD
DIST_EPS = 1e-8     # DIST's epsilon added to the product of norms


def _onehot(target, C):
    y, valid = _safe_target(target, C)
    return torch.nn.functional.one_hot(y, C).bool(), valid


def binary_log_probs(a, gt):
    """(B, 2) log of [p_y, 1 - p_y] of softmax(a), each a log-sum-exp difference (finite for C >= 2)."""
    lse = torch.logsumexp(a, dim=-1)
    log_y = torch.logsumexp(a.masked_fill(~gt, float("-inf")), dim=-1) - lse
    log_o = torch.logsumexp(a.masked_fill(gt, float("-inf")), dim=-1) - lse
    return torch.stack([log_y, log_o], dim=-1)


def dkd_rows(student_logits, teacher_logits, target, alpha, beta, temperature):
    """Per-row alpha * TCKD + beta * NCKD (each T^2-scaled); the batch mean is the DKD loss."""
    ct = compute_dtype(student_logits)
    a_s, a_t = student_logits.to(ct) / temperature, teacher_logits.to(ct) / temperature
    gt, valid = _onehot(target, a_s.shape[-1])
    lb_s, lb_t = binary_log_probs(a_s, gt), binary_log_probs(a_t, gt)
    tckd = (temperature ** 2) * (lb_t.exp() * (lb_t - lb_s)).sum(dim=-1)
    mask = DKD_MASK * gt.to(ct)
    nckd = (temperature ** 2) * kl_rows(a_t - mask, a_s - mask, 1.0)
    rows = alpha * tckd + beta * nckd
    return torch.where(valid, rows, torch.full_like(rows, float("nan")))


def dkd_loss_eager(student_logits, teacher_logits, target, alpha, beta, temperature):
    return dkd_rows(student_logits, teacher_logits, target, alpha, beta, temperature).mean()


def pearson_rows(a, b, eps=DIST_EPS):
    """Per-row Pearson correlation of a and b (B, C): cosine of the row-centred vectors, eps on the norms."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss_eager(student_logits, teacher_logits, beta, gamma, temperature):
    """T^2 (beta (1 - mean row Pearson) + gamma (1 - mean column Pearson)) of softmax(z / T)."""
    ct = compute_dtype(student_logits)
    p_s = torch.softmax(student_logits.to(ct) / temperature, dim=1)
    p_t = torch.softmax(teacher_logits.to(ct) / temperature, dim=1)
    inter = 1.0 - pearson_rows(p_s, p_t).mean()
    intra = 1.0 - pearson_rows(p_s.t(), p_t.t()).mean()
    return (temperature ** 2) * (beta * inter + gamma * intra)


def ofa_target_weights(teacher_logits, gt, eps, temperature):
    """((p_t + m)^eps - m): p_t^eps off the target, expm1(eps log1p(p_t,y)) at it; teacher_logits in ct."""
    logp_t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    at_y = torch.expm1(eps * torch.log1p(logp_t.exp()))
    return torch.where(gt, at_y, torch.exp(eps * logp_t))


def ofa_loss_eager(logits, teacher_logits, target, eps, temperature):
    """mean_b -sum_c ((p_t + 1_y)^eps - 1_y)_c log softmax(logits / T)_c."""
    ct = compute_dtype(logits)
    gt, valid = _onehot(target, logits.shape[-1])
    w = ofa_target_weights(teacher_logits.to(ct), gt, eps, temperature)
    rows = -(w * torch.log_softmax(logits.to(ct) / temperature, dim=-1)).sum(dim=-1)
    return torch.where(valid, rows, torch.full_like(rows, float("nan"))).mean()
