"""The HCD module: a projector and a CFM per used student stage, and the calls into kernels.*.

The frozen teacher is not part of this module (it is run beside it, so DeepSpeed never wraps, partitions or
converts it): the trainer passes the teacher's (f_t, z_t) into forward.
"""
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hcd.kernels import HCDLossConfig, hcd_head_loss, student_loss


def _sep_block(c_in: int, c_out: int) -> nn.Sequential:
    """dwconv3x3(s2) -> conv1x1 -> BN -> ReLU -> dwconv3x3(s1) -> conv1x1 -> BN -> ReLU (OFA-KD's block).

    As in OFA-KD (the projector of docs/method.md, Modules), the block keeps c_in channels up to its last conv1x1,
    which alone maps c_in -> c_out: changing the width at the first conv1x1 instead would run the second
    half at c_out and make the stage-1 projector about 3x larger (ResNet18 into D_p = 768)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_in, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def projector_channels(stage: int, c_in: int, d_p: int) -> list:
    """Output widths of the (4 - stage) down-sampling blocks: doubling, the last one ending at D_p."""
    blocks = 4 - stage
    return [c_in * 2 ** (k + 1) for k in range(blocks - 1)] + [d_p]


def projector_width(d_s: int, d_t: int) -> int:
    """D_p = max(D_s, D_t): every projector's output width (docs/method.md, Notation)."""
    return max(d_s, d_t)


def head_input_widths(d_s: int, d_t: int, cfm_hidden: Optional[int] = None) -> Tuple[int, int]:
    """The widths of the fused head's (x_student, x_teacher) for a student / teacher pair: (D_p, D_t), or
    (cfm_hidden, 0) with a hidden CFM layer, whose activations mix both (see CFM.kernel_inputs)."""
    return (cfm_hidden, 0) if cfm_hidden else (projector_width(d_s, d_t), d_t)


class Projector(nn.Module):
    """P_i: stage feature map (B, C_i, H, W) -> h_i (B, D_p) (docs/method.md, Modules: Projector)."""

    def __init__(self, stage: int, c_in: int, d_p: int):
        super().__init__()
        if stage == 4:
            self.body = nn.Conv2d(c_in, d_p, 1)
        else:
            layers, c = [], c_in
            for c_out in projector_channels(stage, c_in, d_p):
                layers.append(_sep_block(c, c_out))
                c = c_out
            self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.body(x)).flatten(1)


class CFM(nn.Module):
    """Complementary Feature Mapper: concat(h_i, f_t) -> n*C logits. The (last) Linear is not applied here:
    its weight and bias go to kernels.hcd_head_loss, which fuses it with the losses."""

    def __init__(self, d_p: int, d_t: int, num_classes: int, n: int, hidden: Optional[int] = None):
        super().__init__()
        self.hidden = None
        d_in = d_p + d_t
        if hidden:
            self.hidden = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True))
            d_in = hidden
        self.out = nn.Linear(d_in, n * num_classes)

    def kernel_inputs(self, h: torch.Tensor, f_t: torch.Tensor):
        """(x_student, x_teacher) for hcd_head_loss: the Linear's input split into its two column ranges."""
        if self.hidden is None:
            return h, f_t
        z = self.hidden(torch.cat([h, f_t], dim=1))
        return z, z[:, :0]  # the hidden layer mixes both: everything is "x_student", x_teacher is empty


class DistillOutput(NamedTuple):
    """A named tuple, so DeepSpeed ZeRO-3's module hooks see the tensors inside."""
    logits: torch.Tensor           # student logits (B, C)
    loss: torch.Tensor             # the total of docs/method.md, Losses
    parts: Dict[str, torch.Tensor]  # detached, unweighted: ce, kd, sce, skl, ol (+ per stage sce1, skl1, ...)


class HCDDistiller(nn.Module):
    """Student + projectors + CFMs; forward(images, target, f_t, z_t) -> DistillOutput."""

    def __init__(self, student: nn.Module, teacher_dim: int, num_classes: int, loss_cfg: HCDLossConfig,
                 stages: Optional[Sequence[int]] = None, cfm_hidden: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        # The student returns features for its own stages, in order: a different list here would put
        # stage-3 features into a stage-1 projector and log them under the wrong name.
        if stages is not None and list(stages) != list(student.stages):
            raise ValueError(f"head.stages: {list(stages)} differ from the student's stages {student.stages}")
        self.student = student
        self.loss_cfg = loss_cfg
        self.stages = list(student.stages)
        self.backend = backend
        d_p = projector_width(student.feature_dim, teacher_dim)
        self.projectors = nn.ModuleList(
            Projector(s, c, d_p) for s, c in zip(self.stages, student.stage_channels))
        self.cfms = nn.ModuleList(
            CFM(d_p, teacher_dim, num_classes, loss_cfg.n_sublogits, cfm_hidden) for _ in self.stages)

    def forward(self, images, target, f_t, z_t) -> DistillOutput:
        logits, feats = self.student(images)
        dtype = logits.dtype
        z_t = z_t.to(dtype)
        total, parts = student_loss(logits, z_t, target, self.loss_cfg, backend=self.backend)
        sums = {"sce": 0.0, "skl": 0.0, "ol": 0.0}
        for stage, feat, proj, cfm in zip(self.stages, feats, self.projectors, self.cfms):
            x_s, x_t = cfm.kernel_inputs(proj(feat), f_t.to(dtype))
            w, b = cfm.out.weight, cfm.out.bias
            head_total, head = hcd_head_loss(x_s.to(dtype), x_t.to(dtype), w, b, z_t, logits, target,
                                             self.loss_cfg, backend=self.backend)
            total = total + head_total
            for key, name in (("sce", "ce"), ("skl", "kl"), ("ol", "ol")):
                parts[f"{key}{stage}"] = head[name]
                sums[key] = sums[key] + head[name]
        parts.update(sums)
        return DistillOutput(logits=logits, loss=total, parts=parts)


def build_distiller(cfg, device, rank: int = 0):
    """(teacher, distiller, mean, std) for a run config: the frozen teacher on `device`, the student with a
    projector and CFM per stage (identical initial weights on every rank), the student's normalisation."""
    from hcd.engine.models import build_student, build_teacher, norm_stats
    m = cfg.model
    if m.teacher_checkpoint is None and not m.pretrained and rank == 0:
        print("warning: model.teacher_checkpoint is not set and model.pretrained is false: the teacher is "
              "randomly initialised, and distilling from it teaches nothing (train.teacher_epochs is used by "
              "`hcd demo` only)", flush=True)
    torch.manual_seed(cfg.seed)
    student = build_student(m.student, m.num_classes, cfg.head.stages, m.student_checkpoint, m.pretrained,
                            m.student_kwargs)
    mean, std = norm_stats(student.model)
    teacher = build_teacher(m.teacher, m.num_classes, m.teacher_checkpoint, m.pretrained, m.teacher_kwargs,
                            student_mean=mean, student_std=std).to(device)
    distiller = HCDDistiller(student, teacher.feature_dim, m.num_classes, cfg.loss, cfg.head.stages,
                             cfg.head.cfm_hidden, cfg.head.backend)
    return teacher, distiller, mean, std
