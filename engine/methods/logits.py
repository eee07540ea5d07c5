"""Methods acting on the student's logits alone, with no projector: CE (no teacher), KD, DKD and DIST.

Every total is ce_weight * CE_eps(z_s, y) + the method's term, so one recipe (label smoothing, CE weight)
holds for every method; each term is one call into hcd.kernels (backend as head.backend).
"""
import torch.nn as nn
import torch.nn.functional as F

from hcd.engine.distiller import DistillOutput
from hcd.kernels import dist_loss, dkd_loss, student_loss
from hcd.kernels.reference import compute_dtype


def smoothed_ce(logits, target, label_smoothing: float):
    """CE_eps(z, y) in fp32 for 16-bit logits (docs/method.md, Numerics; float64 stays float64). target: (B,)
    labels or (B, C) probabilities (docs/method.md, Soft targets), read in the same compute dtype; for these
    F.cross_entropy computes -sum_c ((1-eps) t_c + eps/C) log p_c, the soft CE of hcd.kernels (not
    renormalised)."""
    ct = compute_dtype(logits)
    return F.cross_entropy(logits.to(ct), target.to(ct) if target.is_floating_point() else target,
                           label_smoothing=label_smoothing)


def dkd_warmup(epoch: int, warmup_epochs: float) -> float:
    """DKD's loss weight in epoch `epoch` (0-based): min((epoch + 1) / warm-up, 1), the reference code's
    min(epoch / warm-up, 1) with its epochs counted from 1."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


class LogitDistiller(nn.Module):
    """method ce | kd | dkd | dist: the student and one loss on its logits (and the teacher's)."""

    def __init__(self, student: nn.Module, method: str, loss_cfg, backend: str = "auto"):
        super().__init__()
        if method not in ("ce", "kd", "dkd", "dist"):
            raise ValueError(f"method: {method!r} is not a logit method")
        self.student, self.method, self.loss_cfg, self.backend = student, method, loss_cfg, backend
        self.stages = []
        self.projectors = nn.ModuleList()   # none (what prepare_models compiles)
        self.uses_teacher = method != "ce"
        self.dkd_factor = 1.0

    def set_epoch(self, epoch: int) -> None:
        self.dkd_factor = dkd_warmup(epoch, self.loss_cfg.dkd.warmup_epochs)

    def forward(self, images, target, f_t, z_t) -> DistillOutput:
        logits, _ = self.student(images)
        c = self.loss_cfg
        if self.method == "kd":  # the fused student loss: ce_weight * CE + kd_weight * KD
            total, parts = student_loss(logits, z_t.to(logits.dtype), target, c.hcd(), backend=self.backend)
            return DistillOutput(logits=logits, loss=total, parts=parts)
        ce = smoothed_ce(logits, target, c.label_smoothing)
        parts = {"ce": ce.detach()}
        total = c.ce_weight * ce
        if self.method == "dkd":
            term = dkd_loss(logits, z_t.to(logits.dtype), target, alpha=c.dkd.alpha, beta=c.dkd.beta,
                            temperature=c.dkd.temperature, backend=self.backend)
            total = total + self.dkd_factor * term
            parts["dkd"] = term.detach()
        elif self.method == "dist":
            term = dist_loss(logits, z_t.to(logits.dtype), beta=c.dist.beta, gamma=c.dist.gamma,
                             temperature=c.dist.temperature, backend=self.backend)
            total = total + term
            parts["dist"] = term.detach()
        return DistillOutput(logits=logits, loss=total, parts=parts)
