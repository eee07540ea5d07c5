"""OFA-KD (Hao et al., NeurIPS 2023; docs/method.md, Baselines): per used student stage the projector of HCD
(engine/projectors.py; a TokenProjector for a token student) followed by a Linear to C logits, initialised as
OFA-KD's init_weights (head.init: ofa, the default; torch keeps PyTorch's defaults).

total = ce_weight * CE_eps(z_s, y) + kd_weight * OFA(z_s; logits_eps) + ofa.weight * sum_i OFA(logits_i; eps_i),
OFA(z; eps) = batch mean of -sum_c ((p_t + 1_y)^eps - 1_y)_c log p_s,c at ofa.temperature (the reference code's
gt, kd and ofa loss weights are ce_weight, kd_weight and ofa.weight here).
"""
import torch
import torch.nn as nn

from hcd.engine.distiller import DistillOutput, init_heads_
from hcd.engine.methods.logits import smoothed_ce
from hcd.engine.projectors import projector_width, stage_projectors
from hcd.kernels import ofa_loss


class OFADistiller(nn.Module):
    """Student + one (projector, Linear(D_p -> C)) per used stage; forward(images, target, f_t, z_t)."""

    uses_teacher = True

    def __init__(self, student: nn.Module, teacher_dim: int, num_classes: int, loss_cfg, backend: str = "auto",
                 init: str = "ofa"):
        super().__init__()
        self.student, self.loss_cfg, self.backend = student, loss_cfg, backend
        self.stages = list(student.stages)
        d_p = projector_width(student.feature_dim, teacher_dim)
        # CNN: OFA-KD's projector to D_p; token student: to D_s, where OFA-KD's token projector puts its
        # classifier (docs/method.md, Token students); each head reads its projector's out_dim
        self.projectors = stage_projectors(student, d_p, token_out=None)
        self.heads = nn.ModuleList(nn.Linear(p.out_dim, num_classes) for p in self.projectors)
        init_heads_(init, self.projectors, self.heads)
        o = loss_cfg.ofa
        self.stage_eps = [float(e) for e in o.stage_eps] if o.stage_eps is not None else [o.eps] * len(self.stages)

    def set_epoch(self, epoch: int) -> None:
        pass

    def forward(self, images, target, f_t, z_t) -> DistillOutput:
        logits, feats = self.student(images)
        c, o = self.loss_cfg, self.loss_cfg.ofa
        z_t = z_t.to(logits.dtype)
        ce = smoothed_ce(logits, target, c.label_smoothing)
        kd = ofa_loss(logits, z_t, target, eps=o.logits_eps, temperature=o.temperature, backend=self.backend)
        stage_terms = [ofa_loss(head(proj(feat)), z_t, target, eps=eps, temperature=o.temperature,
                                backend=self.backend)
                       for proj, head, feat, eps in zip(self.projectors, self.heads, feats, self.stage_eps)]
        ofa = torch.stack(stage_terms).sum()
        total = c.ce_weight * ce + c.kd_weight * kd + o.weight * ofa
        parts = {"ce": ce.detach(), "kd": kd.detach(), "ofa": ofa.detach()}
        parts.update({f"ofa{s}": t.detach() for s, t in zip(self.stages, stage_terms)})
        return DistillOutput(logits=logits, loss=total, parts=parts)
