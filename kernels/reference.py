"""Eager PyTorch reference of the HCD losses: the numerics ground truth (docs/method.md, Losses, term by term).

Readable over fast. All arithmetic is float32 for 16-bit inputs (float64 stays float64); the scalar
losses come back in that compute dtype and autograd returns gradients in each input's own dtype.
Out-of-range labels (only possible on CUDA, where they are not checked up front) give NaN rows
rather than an out-of-bounds read. target is (B,) int64 labels or (B, C) soft targets (mixup / cutmix
probabilities, docs/method.md, Soft targets), read in the compute dtype; a soft row with a non-finite entry
(CUDA only) gives a NaN CE row the same way.
"""
import torch
import torch.nn.functional as F


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _safe_target(target, num_classes):
    valid = (target >= 0) & (target < num_classes)
    return target.clamp(0, num_classes - 1), valid


def is_soft(target) -> bool:
    """A (..., C) float probability target (docs/method.md, Soft targets) rather than int64 labels."""
    return target.is_floating_point()


def _safe_soft(target, dtype):
    """(t, valid) of a soft target read in `dtype` (the logits' compute dtype): a row with a non-finite entry
    (unchecked on CUDA) is zeroed and marked invalid, so its CE is NaN with finite gradients, as for an
    out-of-range label."""
    t = target.to(dtype)
    valid = torch.isfinite(t).all(dim=-1)
    return torch.where(valid.unsqueeze(-1), t, torch.zeros_like(t)), valid


def target_labels(target, num_classes, dtype):
    """(y, valid): the class each row's orthogonality mask zeroes. Labels are clamped into range; a soft
    target's is argmax(t) of its row read in `dtype` (the compute dtype), ties to the first maximal index
    (torch.argmax's rule, which the fused kernels follow)."""
    if not is_soft(target):
        return _safe_target(target, num_classes)
    t, valid = _safe_soft(target, dtype)
    return t.argmax(dim=-1), valid


def smoothed_ce_rows(logits, target, eps):
    """Per-row CE_eps(logits, y) = (1-eps)(-log p_y) + eps * mean_c(-log p_c); logits (..., C), target (...).

    A soft target t (..., C): -sum_c t'_c log p_c with t' = (1-eps) t + eps/C, written as
    (1-eps)(-sum_c t_c log p_c) + eps * mean_c(-log p_c) so that a one-hot t gives the label path's value
    exactly. t is not renormalised (timm's SoftTargetCrossEntropy does not either)."""
    C = logits.shape[-1]
    logp = torch.log_softmax(logits, dim=-1)
    if is_soft(target):
        t, valid = _safe_soft(target, logits.dtype)
        nll = -(t * logp).sum(dim=-1)
    else:
        y, valid = _safe_target(target, C)
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    smooth = -logp.mean(dim=-1)
    rows = (1.0 - eps) * nll + eps * smooth
    return torch.where(valid, rows, torch.full_like(rows, float("nan")))


def kl_rows(target_logits, learner_logits, T):
    """Per-row T^2 * sum_c p_c (log p_c - log q_c), p = softmax(target/T), q = softmax(learner/T)."""
    logp = torch.log_softmax(target_logits / T, dim=-1)
    logq = torch.log_softmax(learner_logits / T, dim=-1)
    return (T * T) * (logp.exp() * (logp - logq)).sum(dim=-1)


def orthogonality_rows(fused, target, threshold):
    """Per-sample mean over the n(n-1) off-diagonal pairs of relu(cos(u_p, u_q) - theta)^2.

    fused (B, n, C); the ground-truth class entry of every sub-logit is zeroed before L2 normalisation
    (docs/method.md, Choices: zero mask); for a soft target (B, C) the class argmax(t) (target_labels).
    n = 1 has no pair: the loss is 0.
    """
    B, n, C = fused.shape
    if n == 1:
        return fused.sum(dim=(1, 2)) * 0.0  # zero, but still connected to the graph
    y, _ = target_labels(target, C, fused.dtype)
    keep = torch.ones(B, 1, C, dtype=fused.dtype, device=fused.device)
    keep.scatter_(2, y.view(B, 1, 1), 0.0)
    u = F.normalize(fused * keep, p=2.0, dim=-1, eps=1e-12)
    gram = u @ u.transpose(1, 2)
    off = 1.0 - torch.eye(n, dtype=fused.dtype, device=fused.device)
    pen = torch.relu(gram - threshold).square() * off
    return pen.sum(dim=(1, 2)) / (n * (n - 1))


def sublogits(x_student, x_teacher, weight, bias, teacher_logits, cfg):
    """Z~ (B, n, C) = alpha_s * ([x_s, x_t] W^T + b).view(B, n, C) + alpha_t * z_t, in the compute dtype."""
    ct = compute_dtype(x_student)
    Dp = x_student.shape[1]
    w = weight.to(ct)
    z = x_student.to(ct) @ w[:, :Dp].t() + x_teacher.to(ct) @ w[:, Dp:].t()
    if bias is not None:
        z = z + bias.to(ct)
    B, C = teacher_logits.shape
    z = z.view(B, cfg.n_sublogits, C)
    return cfg.student_scale * z + cfg.teacher_scale * teacher_logits.to(ct).unsqueeze(1)


def hcd_head_parts(x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg):
    """One stage's unweighted (L_sce, L_skl, L_ol), each a 0-dim tensor still attached to the graph."""
    ct = compute_dtype(x_student)
    fused = sublogits(x_student, x_teacher, weight, bias, teacher_logits, cfg)
    B, n, C = fused.shape
    zs = student_logits.to(ct)
    y = target.unsqueeze(1).expand(B, n, C) if is_soft(target) else target.view(B, 1).expand(B, n)
    sce = smoothed_ce_rows(fused, y, cfg.label_smoothing).mean()
    kl_target = fused.detach() if cfg.detach_sublogit_target else fused
    skl = kl_rows(kl_target, zs.unsqueeze(1).expand(B, n, C), cfg.temperature).mean()
    ol = orthogonality_rows(fused, target, cfg.ol_threshold).mean()
    return sce, skl, ol


def hcd_head_loss_eager(x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg):
    sce, skl, ol = hcd_head_parts(x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg)
    total = cfg.ce_weight * sce + cfg.sublogit_kl_weight * skl + cfg.ol_weight * ol
    return total, sce, skl, ol


def student_loss_eager(student_logits, teacher_logits, target, cfg):
    """(total, L_ce, L_kd): CE_eps(z_s, y) and T_kd^2 KL(softmax(z_t/T_kd) || softmax(z_s/T_kd))."""
    ct = compute_dtype(student_logits)
    zs, zt = student_logits.to(ct), teacher_logits.to(ct)
    ce = smoothed_ce_rows(zs, target, cfg.label_smoothing).mean()
    kd = kl_rows(zt, zs, cfg.kd_temperature).mean()
    return cfg.ce_weight * ce + cfg.kd_weight * kd, ce, kd


def hcd_loss_eager(x_students, x_teacher, weights, biases, teacher_logits, student_logits, target, cfg):
    """The whole loss of docs/method.md (Losses, Total) from the per-stage and student references:
    (total, [ce, kd, sce, skl, ol, sce_1..S, skl_1..S, ol_1..S]), stage terms summed over the S stages.
    x_students (S, B, Dp) or a sequence of S (B, Dp); weights (S, n*C, Dp+Dt); biases (S, n*C) or None."""
    total, ce, kd = student_loss_eager(student_logits, teacher_logits, target, cfg)
    stage_terms = [hcd_head_parts(x_students[s], x_teacher, weights[s], None if biases is None else biases[s],
                                  teacher_logits, student_logits, target, cfg) for s in range(len(x_students))]
    sce, skl, ol = (list(terms) for terms in zip(*stage_terms))
    total = total + cfg.ce_weight * sum(sce) + cfg.sublogit_kl_weight * sum(skl) + cfg.ol_weight * sum(ol)
    return total, [ce, kd, sum(sce), sum(skl), sum(ol), *sce, *skl, *ol]
