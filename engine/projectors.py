"""The stage projectors P_i (docs/method.md, Modules: Projector): OFA-KD's down-sampling convolutions for a CNN
student's NCHW stage maps, and OFA-KD's patch-merging + transformer-block projector for a token-sequence
student's patch grids (docs/method.md, Token students). HCD's and OFA's distillers both build them
through stage_projectors, so the two methods read a student the same way."""
import math
from typing import Optional

import torch
import torch.nn as nn

TOKEN_GRID = 7        # OFA-KD's final_patch_grid: a token projector merges patches down to about 7x7 (49 tokens)
TOKEN_HEADS = 4       # OFA-KD's Block(dim=feature_dim_s, num_heads=4)


def projector_width(d_s: int, d_t: int) -> int:
    """D_p = max(D_s, D_t): every projector's output width (docs/method.md, Notation)."""
    return max(d_s, d_t)


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


class Projector(nn.Module):
    """P_i: stage feature map (B, C_i, H, W) -> h_i (B, D_p) (docs/method.md, Modules: Projector)."""

    def __init__(self, stage: int, c_in: int, d_p: int):
        super().__init__()
        self.out_dim = d_p
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


def token_merge_count(grid: int) -> int:
    """OFA-KD's merge_num = max(int(log2(grid / 7)), 0): patch mergings (each halving the grid) that bring a
    grid x grid patch grid down to about 7 x 7 (14 -> 1 merging, 28 -> 2, 56 -> 3, 7 or 8 -> none)."""
    if grid < 1:
        raise ValueError(f"grid: {grid} must be at least 1")
    return max(int(math.log2(grid / TOKEN_GRID)), 0)


def token_block_count(stage: int) -> int:
    """OFA-KD's max(4 - stage, 1) transformer blocks: 3, 2, 1, 1 for stages 1..4 (deeper for earlier stages,
    as the CNN projector's 4 - stage down-sampling blocks, but never none)."""
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"stage: {stage} is not one of 1, 2, 3, 4")
    return max(4 - stage, 1)


def merge_activations(merges: int) -> list:
    """Whether a GELU follows each patch merging: OFA-KD's act_layer, GELU for the first merging and for
    every other one but the last (a single merging keeps its GELU; 2 -> GELU, none; 3 -> GELU, GELU, none)."""
    return [k == 0 or k < merges - 1 for k in range(merges)]


class TokenProjector(nn.Module):
    """P_i of a token-sequence student (docs/method.md, Token students): the stage's patch grid
    (B, C_i, H, W), with the model's prefix (class / distillation) tokens (B, P, C_i) beside it when it has
    any, -> h_i (B, out_dim).

    OFA-KD's layout: token_merge_count(grid) patch mergings (timm's Swin PatchMerging, the first to the
    student's width D_s, GELUs as merge_activations says) on the patch tokens only, the prefix tokens set
    back in front, token_block_count(stage) timm ViT Blocks of width D_s and 4 heads, then the class token
    (class_token) or the mean of the patch tokens. OFA-KD ends with Linear(D_s -> classes); here that is a Linear(D_s ->
    out_dim) (HCD: out_dim = D_p, none when D_p = D_s) or nothing (out_dim None: OFA's head follows)."""

    def __init__(self, stage: int, c_in: int, grid: int, width: int, out_dim: Optional[int] = None,
                 class_token: bool = False, prefix_tokens: int = 0):
        super().__init__()
        from timm.models.swin_transformer import PatchMerging
        from timm.models.vision_transformer import Block
        if width % TOKEN_HEADS:
            raise ValueError(f"width: {width} is not divisible by the projector's {TOKEN_HEADS} attention heads")
        if prefix_tokens and c_in != width:  # never for the supported families: prefix tokens mean a ViT
            raise ValueError(f"c_in: prefix tokens of width {c_in} cannot join blocks of width {width}")
        if class_token and not prefix_tokens:
            raise ValueError("class_token: the model has no prefix tokens to take the class token from")
        merges = token_merge_count(grid)
        layers, c = [], c_in
        for k in range(merges):
            layers.append(PatchMerging(c, width))  # NHWC in, NHWC out (H/2, W/2, width)
            if merge_activations(merges)[k]:
                layers.append(nn.GELU())
            c = width
        if c != width:  # no merging (a grid under 14) and a narrower stage: tokens to D_s by one Linear
            layers.append(nn.Linear(c, width))
        self.merge = nn.Sequential(*layers)
        self.blocks = nn.Sequential(*[Block(width, TOKEN_HEADS) for _ in range(token_block_count(stage))])
        self.class_token, self.prefix_tokens = class_token, prefix_tokens
        self.out_dim = out_dim or width
        self.out = nn.Linear(width, out_dim) if out_dim not in (None, width) else nn.Identity()

    def forward(self, x):
        grid, prefix = x if isinstance(x, tuple) else (x, None)
        tokens = self.merge(grid.permute(0, 2, 3, 1)).flatten(1, 2)  # NCHW -> NHWC -> (B, L, D_s)
        if prefix is not None:
            tokens = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)
        tokens = self.blocks(tokens)
        pooled = tokens[:, 0] if self.class_token else tokens[:, self.prefix_tokens:].mean(dim=1)
        return self.out(pooled)


def stage_projectors(student: nn.Module, d_p: int, token_out: Optional[int]) -> nn.ModuleList:
    """One projector per stage of the student: Projector(stage, C_i, D_p) for a CNN; for a token-sequence
    student (student.token_grids set) a TokenProjector of width D_s ending at token_out (HCD: D_p; None:
    at D_s, as OFA-KD's own projector before its classifier)."""
    grids = getattr(student, "token_grids", None)
    if grids is None:
        return nn.ModuleList(Projector(s, c, d_p) for s, c in zip(student.stages, student.stage_channels))
    return nn.ModuleList(
        TokenProjector(s, c, g, student.feature_dim, token_out, student.class_token, student.prefix_tokens)
        for s, c, g in zip(student.stages, student.stage_channels, grids))
