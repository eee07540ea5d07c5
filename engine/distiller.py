"""The HCD module: a projector and a CFM per used student stage, and one call into kernels.hcd_loss.

The frozen teacher is not part of this module (it is run beside it, so DeepSpeed never wraps, partitions or
converts it): the trainer passes the teacher's (f_t, z_t) into forward.
"""
import math
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hcd.engine.projectors import Projector, TokenProjector, projector_channels, projector_width, stage_projectors
from hcd.kernels import HCDLossConfig, hcd_loss

__all__ = ["Projector", "TokenProjector", "projector_channels", "projector_width", "stage_projectors",
           "head_input_widths", "HCDDistiller", "DistillOutput", "build_distiller", "init_heads_", "ofa_init_",
           "linear_init_"]  # the projectors moved to engine/projectors.py; importable from here as before


def head_input_widths(d_s: int, d_t: int, cfm_hidden: Optional[int] = None) -> Tuple[int, int]:
    """The widths of the fused head's (x_student, x_teacher) for a student / teacher pair: (D_p, D_t), or
    (cfm_hidden, 0) with a hidden CFM layer, whose activations mix both (see HCDDistiller.forward)."""
    return (cfm_hidden, 0) if cfm_hidden else (projector_width(d_s, d_t), d_t)


def linear_init_(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """nn.Linear's default initialisation (kaiming-uniform with a = sqrt(5), bias uniform in +-1/sqrt(fan_in))
    of one (out, in) weight and its bias, drawing the same random numbers in the same order as nn.Linear."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias is not None:
            fan_in = weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(bias, -bound, bound)


def ofa_init_(module: nn.Module) -> None:
    """OFA-KD's init_weights (docs/method.md, Modules: Initialisation): convs kaiming-normal (fan_out, ReLU),
    BatchNorm 1/0, Linear trunc-normal std 0.02 with zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_heads_(init: str, *modules: nn.Module) -> None:
    """head.init: "ofa" applies ofa_init_ to the modules, "torch" leaves PyTorch's default initialisation."""
    if init not in ("ofa", "torch"):
        raise ValueError(f"head.init: {init!r} is not one of 'ofa', 'torch'")
    if init == "ofa":
        for m in modules:
            ofa_init_(m)


class DistillOutput(NamedTuple):
    """A named tuple, so DeepSpeed ZeRO-3's module hooks see the tensors inside."""
    logits: torch.Tensor           # student logits (B, C)
    loss: torch.Tensor             # the total of docs/method.md, Losses
    parts: Dict[str, torch.Tensor]  # detached, unweighted: ce, kd, sce, skl, ol (+ per stage sce1, skl1, ...)


class HCDDistiller(nn.Module):
    """Student + projectors + CFMs; forward(images, target, f_t, z_t) -> DistillOutput.

    The contract every method keeps (engine/methods): `student`, `projectors` (compiled by train.compile),
    `uses_teacher` (false: the trainer skips the teacher's forward and passes None), set_epoch(epoch) at the
    start of every epoch (0-based; for methods whose weights follow the epoch), forward -> DistillOutput."""

    uses_teacher = True

    def __init__(self, student: nn.Module, teacher_dim: int, num_classes: int, loss_cfg: HCDLossConfig,
                 stages: Optional[Sequence[int]] = None, cfm_hidden: Optional[int] = None, backend: str = "auto",
                 init: str = "ofa"):
        super().__init__()
        # The student returns features for its own stages, in order: a different list here would put
        # stage-3 features into a stage-1 projector and log them under the wrong name.
        if stages is not None and list(stages) != list(student.stages):
            raise ValueError(f"head.stages: {list(stages)} differ from the student's stages {student.stages}")
        self.student = student
        self.loss_cfg = loss_cfg
        self.stages = list(student.stages)
        self.backend = backend
        self.loss_fn = hcd_loss  # hcd_loss's signature; train.cuda_graph_loss replays it from CUDA graphs
        d_p = projector_width(student.feature_dim, teacher_dim)
        self.projectors = stage_projectors(student, d_p, token_out=d_p)  # every h_i of width D_p
        # The CFMs (docs/method.md, Modules: CFM). Their output Linears of all stages are one (S, n*C, D)
        # weight and one (S, n*C) bias, read by the fused loss as they are; with head.cfm_hidden each stage
        # keeps its own hidden Linear + ReLU in front (D = H then). Initialised stage by stage exactly as the
        # per-stage nn.Linear layers were (same draws, same order: hidden layer, then output layer).
        n_out, d_in = loss_cfg.n_sublogits * num_classes, cfm_hidden or d_p + teacher_dim
        self.cfm_weight = nn.Parameter(torch.empty(len(self.stages), n_out, d_in))
        self.cfm_bias = nn.Parameter(torch.empty(len(self.stages), n_out))
        hidden = []
        for s in range(len(self.stages)):
            if cfm_hidden:
                hidden.append(nn.Sequential(nn.Linear(d_p + teacher_dim, cfm_hidden), nn.ReLU(inplace=True)))
            linear_init_(self.cfm_weight[s], self.cfm_bias[s])
        self.cfm_hidden = nn.ModuleList(hidden) if cfm_hidden else None
        # head.init (docs/method.md, Modules: Initialisation): "ofa" re-initialises what "torch" drew above
        init_heads_(init, self.projectors, *([self.cfm_hidden] if cfm_hidden else []))
        if init == "ofa":  # the stacked CFM output Linears: trunc-normal 0.02, zero bias, as nn.Linear under ofa_init_
            with torch.no_grad():
                nn.init.trunc_normal_(self.cfm_weight, std=0.02)
                self.cfm_bias.zero_()

    def set_epoch(self, epoch: int) -> None:
        pass

    def forward(self, images, target, f_t, z_t) -> DistillOutput:
        logits, feats = self.student(images)
        dtype = logits.dtype
        f_t, z_t = f_t.to(dtype), z_t.to(dtype)
        h = [proj(feat) for proj, feat in zip(self.projectors, feats)]
        if self.cfm_hidden is not None:  # the hidden layer mixes both: it is all "x_student", x_teacher is empty
            h = [layer(torch.cat([x.to(dtype), f_t], dim=1)) for layer, x in zip(self.cfm_hidden, h)]
            f_t = f_t[:, :0]
        x_s = torch.stack(h).to(dtype)  # (S, B, D_p or H): one copy, one cast at most
        with torch.autocast(x_s.device.type, enabled=False):  # the loss: docs/method.md, Numerics
            total, parts = self.loss_fn(x_s, f_t, self.cfm_weight, self.cfm_bias, z_t, logits, target,
                                        self.loss_cfg, backend=self.backend, stages=self.stages)
        return DistillOutput(logits=logits, loss=total, parts=parts)


def build_distiller(cfg, device, rank: int = 0):
    """(teacher, distiller, mean, std) for a run config: the frozen teacher on `device`, the module of
    cfg.method around the student (identical initial weights on every rank), the student's normalisation."""
    from hcd.engine.data.batch_aug import train_loss_config
    from hcd.engine.models import build_student, build_teacher, check_student_input, norm_stats
    cfg = train_loss_config(cfg)  # Mixup/CutMix: the mixed target carries the smoothing (method.md, Soft targets)
    m = cfg.model
    if m.teacher_checkpoint is None and not m.pretrained and rank == 0:
        print("warning: model.teacher_checkpoint is not set and model.pretrained is false: the teacher is "
              "randomly initialised, and distilling from it teaches nothing (train.teacher_epochs is used by "
              "`hcd demo` only)", flush=True)
    torch.manual_seed(cfg.seed)
    staged = cfg.method in ("hcd", "ofa")  # the logit methods need no stage features
    student = build_student(m.student, m.num_classes, cfg.head.stages if staged else [], m.student_checkpoint,
                            m.pretrained, m.student_kwargs)
    check_student_input(student, cfg.data.img_size)
    mean, std = norm_stats(student.model)
    teacher = build_teacher(m.teacher, m.num_classes, m.teacher_checkpoint, m.pretrained, m.teacher_kwargs,
                            student_mean=mean, student_std=std).to(device)
    if cfg.method == "hcd":
        distiller = HCDDistiller(student, teacher.feature_dim, m.num_classes, cfg.loss.hcd(), cfg.head.stages,
                                 cfg.head.cfm_hidden, cfg.head.backend, cfg.head.init)
    elif cfg.method == "ofa":
        from hcd.engine.methods.ofa import OFADistiller
        distiller = OFADistiller(student, teacher.feature_dim, m.num_classes, cfg.loss, cfg.head.backend,
                                 cfg.head.init)
    else:
        from hcd.engine.methods.logits import LogitDistiller
        distiller = LogitDistiller(student, cfg.method, cfg.loss, cfg.head.backend)
    return teacher, distiller, mean, std
