"""timm teacher and student: the frozen teacher wrapper (f_t and z_t from one forward), the CNN student and the
token-sequence student with their stage features. Families are checked up front so an unsupported model fails
at construction."""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hcd.engine.errors import ModelError

# timm module names (timm.models.<family>) whose models give a pooled pre-logits vector and a classifier.
TEACHER_FAMILIES = {
    "vision_transformer", "deit", "swin_transformer", "swin_transformer_v2", "mlp_mixer", "convnext",
    "resnet", "efficientnet", "regnet", "beit", "eva", "vision_transformer_hybrid", "levit", "cait",
}
# CNN students: NCHW stage features at reductions 4, 8, 16, 32 (stages 1..4 of docs/method.md).
STUDENT_FAMILIES = {"resnet", "efficientnet", "mobilenetv3", "regnet", "convnext", "resnest", "ghostnet"}
# Token-sequence families; as students they get OFA-KD's token projectors (docs/method.md, Token students).
# Supported: ViT / DeiT and the MLP mixers (ResMLP, Mixer, gMLP), isotropic stacks of blocks whose stages
# are block outputs (token_stage_blocks), and Swin, which has four stages of its own.
TOKEN_FAMILIES = {"vision_transformer", "deit", "swin_transformer", "swin_transformer_v2", "mlp_mixer",
                  "beit", "eva", "cait", "levit", "vision_transformer_hybrid"}
TOKEN_STUDENT_FAMILIES = {"vision_transformer", "deit", "mlp_mixer", "swin_transformer"}
STAGED_TOKEN_FAMILIES = {"swin_transformer"}
STAGE_REDUCTIONS = {1: 4, 2: 8, 3: 16, 4: 32}


def model_family(name: str, field: str) -> str:
    """The timm module a model name lives in, e.g. 'resnet18' -> 'resnet'; ModelError for unknown names."""
    import timm
    if not timm.is_model(name):
        raise ModelError(f"{field}: unknown timm model {name!r}")
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def load_state_dict_file(path: str, field: str) -> dict:
    """A checkpoint's state dict: safetensors, or a torch file read with weights_only=True.

    Accepts a bare state dict or one nested under 'state_dict' / 'model' / 'module' (common trainer
    layouts) and strips a DistributedDataParallel 'module.' prefix."""
    p = Path(path).expanduser()  # as check_paths reads it: a config may name ~/...
    if not p.is_file():
        raise ModelError(f"{field}: checkpoint file not found: {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with objects, wrong format
        raise ModelError(f"{field}: cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{field}: {path} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str, field: str) -> None:
    sd = load_state_dict_file(path, field)
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in own]
    problems += [f"{k} has shape {tuple(v.shape)}, model wants {tuple(own[k].shape)}"
                 for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelError(f"{field}: {path} does not fit the model: {', '.join(problems[:3])}{more}")
    model.load_state_dict(sd)


def _create(name: str, num_classes: int, pretrained: bool, kwargs: dict, field: str) -> nn.Module:
    import timm
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as e:  # an unknown kwarg from the config
        raise ModelError(f"{field}: {e}") from None


def norm_stats(model: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


class FrozenTeacher(nn.Module):
    """A frozen timm classifier returning (f_t, z_t) from one forward.

    No parameter requires grad, the model stays in eval mode whatever `.train()` is called with, and the
    forward runs under no_grad (not inference_mode: its outputs are saved for the CFM's backward, which
    inference tensors cannot be). Inputs normalised for the student are re-normalised for the teacher, and
    resized when the teacher was built for a fixed other resolution (ViT patch embedding)."""

    def __init__(self, model: nn.Module, student_mean=None, student_std=None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        head = model.get_classifier()
        if not isinstance(head, nn.Module):
            raise ModelError(f"model.teacher: {type(model).__name__} has several classifier heads; not supported")
        self.head = head
        t_mean, t_std = norm_stats(model)
        s_mean = student_mean if student_mean is not None else t_mean
        s_std = student_std if student_std is not None else t_std
        # x_teacher = (x * s_std + s_mean - t_mean) / t_std, as one per-channel affine map.
        scale = torch.tensor(s_std) / torch.tensor(t_std)
        shift = (torch.tensor(s_mean) - torch.tensor(t_mean)) / torch.tensor(t_std)
        self.renormalise = not (torch.allclose(scale, torch.ones(3)) and torch.allclose(shift, torch.zeros(3)))
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        self.input_size = tuple(size) if size is not None and not getattr(model, "dynamic_img_size", False) else None

    @property
    def feature_dim(self) -> int:
        return pre_logits_width(self.model)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: BatchNorm statistics and dropout never change
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = images
        if self.renormalise:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        weights = next(self.model.parameters()).dtype
        if weights != torch.float32:  # kept in the run's 16-bit dtype (engine/speed.py)
            x = x.to(weights)
        autocast = x.device.type == "cuda" and x.dtype == torch.float32
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            feats = self.model.forward_features(x)
            f_t = self.model.forward_head(feats, pre_logits=True)
            z_t = self.head(f_t)
        return f_t, z_t


class StudentModel(nn.Module):
    """A timm CNN returning (logits, [stage feature maps for the requested stages]); stages may be empty."""

    def __init__(self, model: nn.Module, stages: Sequence[int]):
        super().__init__()
        self.model = model
        self.stages = list(stages)
        info = list(model.feature_info)
        by_reduction = {f["reduction"]: i for i, f in enumerate(info)}
        missing = [s for s in self.stages if STAGE_REDUCTIONS[s] not in by_reduction]
        if missing:
            raise ModelError(f"model.student: {type(model).__name__} has no stage at reduction "
                             f"{STAGE_REDUCTIONS[missing[0]]} (stage {missing[0]})")
        self.indices = [by_reduction[STAGE_REDUCTIONS[s]] for s in self.stages]
        self.stage_channels = [info[i]["num_chs"] for i in self.indices]
        self.feature_dim = model.num_features

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if not self.indices:  # no stage used (the logit methods)
            return self.model(images), []
        final, feats = self.model.forward_intermediates(images, indices=self.indices)
        return self.model.forward_head(final), feats


# Where the stages of an isotropic token model end, in twelfths of its depth: OFA-KD's ViT / DeiT students
# give the outputs of blocks 2, 4, 10, 12 (1-based) of 12 as stages 1-4, Swin-T's 2-2-6-2 stage split.
STAGE_ENDS_OF_12 = (2, 4, 10, 12)


def token_stage_blocks(depth: int, stages: Sequence[int]) -> List[int]:
    """The 0-based blocks whose outputs are the stages of an isotropic token model of `depth` blocks: stage s
    ends after round(depth * STAGE_ENDS_OF_12[s - 1] / 12) blocks (halves up), i.e. blocks 1, 3, 9, 11 of a
    12-block DeiT-T or ResMLP-12, as OFA-KD takes them (docs/method.md, Token students)."""
    if not stages:  # the logit methods use no stage: any depth will do
        return []
    ends = [(depth * e + 6) // 12 for e in STAGE_ENDS_OF_12]  # round half up, in integers
    if ends[0] < 1 or len(set(ends)) < 4:
        raise ValueError(f"depth: {depth} blocks cannot give 4 distinct stages (at least 5 are needed)")
    return [ends[s - 1] - 1 for s in stages]


class TokenStudentModel(nn.Module):
    """A timm token-sequence student returning (logits, [stage features for the requested stages]): a
    feature is the stage's patch grid (B, C_i, H, W) as timm's forward_intermediates gives it, or the pair
    (grid, prefix tokens (B, P, C_i)) for a model with class / distillation tokens. token_grids holds each
    stage's grid side (the projector's patch mergings depend on it), class_token whether the model has one."""

    def __init__(self, model: nn.Module, stages: Sequence[int], staged: bool):
        super().__init__()
        self.model, self.stages = model, list(stages)
        info, name = list(model.feature_info), type(model).__name__
        if staged and len(info) != 4:
            raise ModelError(f"model.student_kwargs: {name} has {len(info)} stages; a staged token student needs 4")
        try:  # Swin: its stage s; ViT / mixers: a block output
            self.indices = [s - 1 for s in self.stages] if staged else token_stage_blocks(len(info), self.stages)
        except ValueError as e:
            raise ModelError(f"model.student_kwargs: {name}: {e}") from None
        embed = model.patch_embed if hasattr(model, "patch_embed") else model.stem
        if getattr(embed, "img_size", None) is None:
            raise ModelError(f"model.student_kwargs: {name} has no fixed img_size; its stage grids are unknown")
        self.img_size = tuple(embed.img_size)
        side = min(self.img_size)
        self.stage_channels = [info[i]["num_chs"] for i in self.indices]
        self.token_grids = [-(-side // info[i]["reduction"]) for i in self.indices]  # ceil: odd grids are padded
        self.prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        self.class_token = getattr(model, "cls_token", None) is not None
        self.feature_dim = model.num_features
        from hcd.engine.projectors import TOKEN_HEADS
        if self.stages and self.feature_dim % TOKEN_HEADS:  # the projectors' blocks run at this width
            raise ModelError(f"model.student_kwargs: {name}'s width {self.feature_dim} is not divisible by the "
                             f"token projector's {TOKEN_HEADS} attention heads (docs/method.md, Token students)")

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, list]:
        if not self.indices:  # no stage used (the logit methods)
            return self.model(images), []
        extra = {"return_prefix_tokens": True} if self.prefix_tokens else {}
        final, feats = self.model.forward_intermediates(images, indices=self.indices, **extra)
        return self.model.forward_head(final), feats


def check_student_input(student: nn.Module, img_size: int) -> None:
    """A token student's patch embedding, stage grids and projectors are built for one input size: a
    data.img_size it was not built for is refused here in one line, not in timm's first forward."""
    size = getattr(student, "img_size", None)
    if size is not None and size != (img_size, img_size):
        raise ModelError(f"model.student_kwargs: {type(student.model).__name__} is built for {size[0]}x{size[1]} "
                         f"inputs but data.img_size is {img_size}: set model.student_kwargs.img_size to {img_size}")


def _build_timm(role: str, name: str, families: set, num_classes: int, checkpoint: Optional[str],
                pretrained: bool, kwargs: Optional[dict]) -> nn.Module:
    """A timm model of a supported family (role: "teacher" or "student"), weights from `checkpoint` if given."""
    family = model_family(name, f"model.{role}")
    if family not in families:
        raise ModelError(f"model.{role}: model family {family!r} ({name}) is not supported as a {role} "
                         f"(supported: {', '.join(sorted(families))})")
    model = _create(name, num_classes, pretrained and checkpoint is None, kwargs or {}, f"model.{role}_kwargs")
    if checkpoint:
        load_weights(model, checkpoint, f"model.{role}_checkpoint")
    return model


def pre_logits_width(model: nn.Module) -> int:
    """D_t: the width of a timm classifier's pre-logits vector (its classifier's input)."""
    head = model.get_classifier()
    return head.in_features if hasattr(head, "in_features") else model.num_features


def feature_widths(teacher: str, student: str, num_classes: int, teacher_kwargs: Optional[dict] = None,
                   student_kwargs: Optional[dict] = None) -> Tuple[int, int]:
    """(D_s, D_t) of a student / teacher pair, from models built on the meta device: no weights are
    allocated or loaded (a shape question must not need a checkpoint or the hub). Names and families are
    checked as for a run. timm releases before ~1.0.21 read drop-path rates out of a tensor while building
    ViT/DeiT/Swin, which the meta device cannot do: those models are then built on the CPU instead."""
    def build(role, name, families, kwargs):
        try:
            with torch.device("meta"):
                return _build_timm(role, name, families, num_classes, None, False, kwargs)
        except (NotImplementedError, RuntimeError):  # "Cannot copy out of meta tensor" (older timm)
            return _build_timm(role, name, families, num_classes, None, False, kwargs)

    d_s = build("student", student, STUDENT_FAMILIES | TOKEN_STUDENT_FAMILIES, student_kwargs).num_features
    return d_s, pre_logits_width(build("teacher", teacher, TEACHER_FAMILIES, teacher_kwargs))


def build_teacher(name: str, num_classes: int, checkpoint: Optional[str] = None, pretrained: bool = False,
                  kwargs: Optional[dict] = None, student_mean=None, student_std=None) -> FrozenTeacher:
    model = _build_timm("teacher", name, TEACHER_FAMILIES, num_classes, checkpoint, pretrained, kwargs)
    return FrozenTeacher(model, student_mean, student_std)


def build_student(name: str, num_classes: int, stages: Sequence[int], checkpoint: Optional[str] = None,
                  pretrained: bool = False, kwargs: Optional[dict] = None) -> nn.Module:
    """A CNN StudentModel or a TokenStudentModel (docs/method.md, Token students) of a timm name."""
    family = model_family(name, "model.student")
    if family in TOKEN_FAMILIES - TOKEN_STUDENT_FAMILIES:
        raise ModelError(f"model.student: model family {family!r} ({name}) is a token-sequence student without "
                         f"stage projectors here (token students: {', '.join(sorted(TOKEN_STUDENT_FAMILIES))})")
    model = _build_timm("student", name, STUDENT_FAMILIES | TOKEN_STUDENT_FAMILIES, num_classes, checkpoint,
                        pretrained, kwargs)
    if family in TOKEN_STUDENT_FAMILIES:
        return TokenStudentModel(model, stages, staged=family in STAGED_TOKEN_FAMILIES)
    return StudentModel(model, stages)
