"""Token-sequence students (docs/method.md, Token students): stage features from timm's
forward_intermediates, OFA-KD's token projector, and HCD / OFA on tiny DeiT, Swin and ResMLP students (CPU)."""
import pytest
import torch
import torch.nn as nn

from hcd.engine.distiller import HCDDistiller, ofa_init_
from hcd.engine.errors import ModelError
from hcd.engine.loss_config import LossConfig
from hcd.engine.methods.ofa import OFADistiller
from hcd.engine.models import build_student, build_teacher, feature_widths, token_stage_blocks
from hcd.engine.projectors import TokenProjector, merge_activations, token_block_count, token_merge_count
from hcd.kernels import HCDLossConfig

# name, timm kwargs, image side; the tiny DeiT has a 14 x 14 grid (one patch merging), as DeiT-T at 224 px
STUDENTS = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=56, patch_size=4, embed_dim=48, depth=6, num_heads=2), 56),
    "deit_distilled": ("deit_tiny_distilled_patch16_224",
                       dict(img_size=32, patch_size=4, embed_dim=48, depth=5, num_heads=2), 32),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=56, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)), 56),
    "resmlp": ("resmlp_12_224", dict(img_size=32), 32),  # ResMLP-12's widths are fixed: 12 blocks of 384
}
TEACHER = dict(img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2)  # D_t = 64


def _teacher(classes=7):
    return build_teacher("vit_tiny_patch16_224", classes, kwargs=TEACHER)


def test_stage_blocks_follow_ofakd_and_swin_t_split():
    """OFA-KD's 12-block ViT students: blocks 1, 3, 9, 11 (0-based), where Swin-T's 2-2-6-2 stages end;
    other depths in proportion (rounded half up), never two stages on one block."""
    assert token_stage_blocks(12, [1, 2, 3, 4]) == [1, 3, 9, 11]
    assert token_stage_blocks(24, [1, 2, 3, 4]) == [3, 7, 19, 23]
    assert token_stage_blocks(6, [1, 2, 3, 4]) == [0, 1, 4, 5]
    assert token_stage_blocks(8, [1, 2, 3, 4]) == [0, 2, 6, 7]     # 1.33, 2.67, 6.67, 8 blocks, rounded
    assert token_stage_blocks(5, [1, 2, 3, 4]) == [0, 1, 3, 4]
    assert token_stage_blocks(12, [2, 4]) == [3, 11]               # the same blocks whatever else is chosen
    with pytest.raises(ValueError, match="^depth: 4 blocks cannot give 4 distinct stages"):
        token_stage_blocks(4, [4])
    assert token_stage_blocks(4, []) == []  # the logit methods use no stage: any depth


def test_a_shallow_vit_is_a_student_of_the_logit_methods_and_odd_widths_are_refused_for_projectors():
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=2)
    student = build_student("deit_tiny_patch16_224", 5, [], kwargs=kw)  # ce / kd / dkd / dist
    logits, feats = student(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5) and feats == []
    with pytest.raises(ModelError, match="^model.student_kwargs: .*width 50 is not divisible by the token "
                                         "projector's 4 attention heads"):
        build_student("deit_tiny_patch16_224", 5, [4], kwargs=dict(kw, embed_dim=50, depth=6))


def test_projector_geometry_follows_ofakd():
    assert [token_merge_count(g) for g in (7, 8, 13, 14, 27, 28, 56, 2)] == [0, 0, 0, 1, 1, 2, 3, 0]
    assert [token_block_count(s) for s in (1, 2, 3, 4)] == [3, 2, 1, 1]
    assert merge_activations(1) == [True] and merge_activations(2) == [True, False]
    assert merge_activations(3) == [True, True, False]
    seen = []
    for stage, grid, merges in [(1, 28, 2), (2, 14, 1), (3, 7, 0), (4, 28, 2)]:
        p = TokenProjector(stage, 24, grid, 32, out_dim=40)
        kinds = [type(m).__name__ for m in p.merge]
        assert kinds.count("PatchMerging") == merges and len(p.blocks) == token_block_count(stage)
        assert kinds.count("Linear") == (merges == 0)  # 24 -> 32 without a merging: one Linear
        handle = p.blocks.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
        h = p(torch.randn(2, 24, grid, grid))
        handle.remove()
        assert h.shape == (2, 40) and seen[-1] == (2, (grid // 2 ** merges) ** 2, 32)  # 7 x 7 after merging
    assert isinstance(TokenProjector(4, 32, 7, 32, out_dim=32).out, nn.Identity)  # D_p = D_s: nothing to add
    assert TokenProjector(4, 32, 7, 32).out_dim == 32                              # OFA: ends at D_s
    with pytest.raises(ValueError, match="^width"):
        TokenProjector(1, 24, 14, 30)


@pytest.mark.parametrize("class_token", [True, False])
def test_projector_pools_the_class_token_or_the_patch_mean(class_token):
    """Float64 reference (OFA-KD's distillers/ofa.py): merge the patch tokens, put the prefix tokens in front,
    run the blocks, then take the class token or the mean of the patch tokens (never the prefix), then the
    final Linear."""
    torch.manual_seed(0)
    p = TokenProjector(2, 16, 14, 16, out_dim=24, class_token=class_token, prefix_tokens=2).double().eval()
    grid, prefix = torch.randn(3, 16, 14, 14, dtype=torch.float64), torch.randn(3, 2, 16, dtype=torch.float64)
    # OFA-KD's PatchMerging: the 2 x 2 neighbours concatenated in the order (0::2, 0::2), (1::2, 0::2),
    # (0::2, 1::2), (1::2, 1::2) of (H, W), LayerNorm(4C), Linear(4C -> D_s) without bias; then its GELU
    x = grid.permute(0, 2, 3, 1)
    merging = p.merge[0]
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    merged = merging.reduction(merging.norm(cat))
    assert merging.reduction.bias is None
    tokens = torch.cat([prefix, nn.functional.gelu(merged).reshape(3, 49, 16)], dim=1)
    for block in p.blocks:
        tokens = block(tokens)
    pooled = tokens[:, 0] if class_token else tokens[:, 2:].mean(dim=1)
    torch.testing.assert_close(p((grid, prefix)), pooled @ p.out.weight.T + p.out.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", list(STUDENTS))
def test_stage_features_feed_projectors_of_the_right_widths(key):
    name, kwargs, side = STUDENTS[key]
    s = build_student(name, 7, [1, 2, 3, 4], kwargs=kwargs)
    logits, feats = s(torch.randn(2, 3, side, side))
    assert logits.shape == (2, 7) and len(feats) == 4
    for f, c, g in zip(feats, s.stage_channels, s.token_grids):
        grid = f[0] if isinstance(f, tuple) else f
        assert grid.shape == (2, c, g, g)
        if isinstance(f, tuple):  # prefix tokens: class (and distillation) token
            assert f[1].shape == (2, s.prefix_tokens, c)
    expect = {"deit": ([48] * 4, [14] * 4, 1, True), "deit_distilled": ([48] * 4, [8] * 4, 2, True),
              "swin": ([16, 32, 64, 128], [14, 7, 4, 2], 0, False), "resmlp": ([384] * 4, [2] * 4, 0, False)}[key]
    assert (s.stage_channels, s.token_grids, s.prefix_tokens, s.class_token) == expect
    assert s.indices == {"deit": [0, 1, 4, 5], "deit_distilled": [0, 1, 3, 4], "swin": [0, 1, 2, 3],
                         "resmlp": [1, 3, 9, 11]}[key]


@pytest.mark.parametrize("key", ["deit", "swin", "resmlp"])
def test_hcd_and_ofa_forward_backward(key):
    name, kwargs, side = STUDENTS[key]
    torch.manual_seed(0)
    t = _teacher()
    stages = [2, 4] if key == "resmlp" else [1, 2, 3, 4]
    s = build_student(name, 7, stages, kwargs=kwargs)
    x, y = torch.randn(3, 3, side, side), torch.randint(0, 7, (3,))
    f_t, z_t = t(x)
    d_p = max(s.feature_dim, 64)
    hcd = HCDDistiller(s, t.feature_dim, 7, HCDLossConfig(n_sublogits=2), backend="eager")
    assert [p.out_dim for p in hcd.projectors] == [d_p] * len(stages)
    assert all(isinstance(p.out, nn.Identity) == (s.feature_dim == d_p) for p in hcd.projectors)
    ofa = OFADistiller(s, t.feature_dim, 7, LossConfig(), backend="eager")
    # OFA-KD's token projector ends at D_s, its classifier reads D_s
    assert [h.in_features for h in ofa.heads] == [s.feature_dim] * len(stages)
    for model, terms in ((hcd, {f"skl{i}" for i in stages}), (ofa, {f"ofa{i}" for i in stages})):
        model.zero_grad()
        out = model(x, y, f_t, z_t)
        out.loss.backward()
        assert out.logits.shape == (3, 7) and torch.isfinite(out.loss) and set(out.parts) >= terms
        heads = [(n, p) for n, p in model.named_parameters() if not n.startswith("student.")]
        assert heads and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in heads), \
            [n for n, p in heads if p.grad is None or p.grad.abs().sum() == 0]


@pytest.mark.parametrize("key,blocks", [("deit", "blocks"), ("swin", "layers")])
def test_projector_gradients_reach_exactly_the_chosen_stages(key, blocks):
    """Backward from the projector outputs alone: the blocks up to the last chosen stage get a gradient,
    those after it none (the stage features are taken where token_stage_blocks / Swin's stages say)."""
    name, kwargs, side = STUDENTS[key]
    s = build_student(name, 7, [1, 2], kwargs=kwargs)
    hcd = HCDDistiller(s, 64, 7, HCDLossConfig(n_sublogits=2), backend="eager")
    _, feats = s(torch.randn(2, 3, side, side))
    sum(p(f).square().sum() for p, f in zip(hcd.projectors, feats)).backward()
    grads = [any(q.grad is not None and q.grad.abs().sum() > 0 for q in b.parameters())
             for b in getattr(s.model, blocks)]
    assert grads == {"deit": [True, True, False, False, False, False], "swin": [True, True, False, False]}[key]


def test_ofa_init_covers_the_token_projector():
    p = TokenProjector(1, 16, 28, 32, out_dim=48)
    ofa_init_(p)
    norms = [m for m in p.modules() if isinstance(m, nn.LayerNorm)]
    linears = [m for m in p.modules() if isinstance(m, nn.Linear)]
    assert len(norms) == 2 + 2 * 3 and len(linears) == 2 + 4 * 3 + 1  # 2 mergings, 3 blocks, the output Linear
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    for m in linears:
        assert m.bias is None or bool((m.bias == 0).all())
        # trunc-normal std 0.02 (cut at +-2 absolute, as timm's): PyTorch's default here has std >= 0.05
        assert 0.017 < m.weight.std() < 0.023 and m.weight.mean().abs() < 0.003


@pytest.mark.parametrize("name,family", [("beit_base_patch16_224", "beit"), ("cait_xxs24_224", "cait")])
def test_unsupported_token_students_are_refused_in_one_line(name, family):
    with pytest.raises(ModelError, match=rf"^model.student: model family '{family}' .*token-sequence") as err:
        build_student(name, 10, [1, 2, 3, 4])
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="^model.student_kwargs: VisionTransformer: depth: 4 blocks"):
        build_student("deit_tiny_patch16_224", 10, [1], kwargs=dict(img_size=32, patch_size=8, embed_dim=48,
                                                                    depth=4, num_heads=2))


def test_feature_widths_of_token_students_and_bench_shapes(tmp_path):
    """hcd bench's head shapes (D_p, D_t) follow a config with a token student (built on the meta device)."""
    from hcd.engine.bench.shapes import config_widths
    assert feature_widths("convnext_tiny", "deit_tiny_patch16_224", 1000) == (192, 768)
    swin_nano = dict(embed_dim=64, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16])  # OFA-KD's Swin-N
    assert feature_widths("resnet50", "swin_tiny_patch4_window7_224", 100, None, swin_nano) == (512, 2048)
    (tmp_path / "cifar100").mkdir()
    (tmp_path / "cifar100" / "pair.yaml").write_text(
        "model: {teacher: resnet50, student: swin_tiny_patch4_window7_224, num_classes: 100,\n"
        "        student_kwargs: {embed_dim: 64, depths: [2, 2, 2, 2], num_heads: [2, 4, 8, 16]}}\n")
    [w] = config_widths(tmp_path)
    assert (w.config, w.C, w.Dp, w.Dt) == ("cifar100/pair.yaml", 100, 2048, 2048)


TINY_RUN = """
model:
  teacher: vit_tiny_patch16_224
  teacher_kwargs: {img_size: 32, patch_size: 8, depth: 1, embed_dim: 64, num_heads: 2}
  student: deit_tiny_patch16_224
  student_kwargs: {img_size: 56, patch_size: 4, embed_dim: 48, depth: 6, num_heads: 2}
  num_classes: 7
data: {img_size: 56}
head: {stages: [1, 4], backend: eager}
loss: {n_sublogits: 2}
"""


def test_channels_last_and_compile_keep_a_token_students_losses(tmp_path, monkeypatch):
    """A DeiT student through build_distiller and prepare_models (engine/speed.py) with train.channels_last
    and train.compile: all gives the eager NCHW run's loss and gradients. Compiled with the aot_eager backend:
    what a token student could break is dynamo's trace of forward_intermediates and of the (grid, prefix
    tokens) pair, forward and backward, which it covers; inductor's CPU code generation takes minutes here."""
    from hcd.engine.config import load_config
    from hcd.engine.distiller import build_distiller
    from hcd.engine.speed import input_layout, prepare_models
    compile_ = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager"))
    (tmp_path / "run.yaml").write_text(TINY_RUN)
    x, y, cpu, runs = torch.randn(2, 3, 56, 56), torch.tensor([1, 5]), torch.device("cpu"), []
    for fast in (False, True):
        cfg = load_config(str(tmp_path / "run.yaml"), (f"train.channels_last={fast}",
                                                       f"train.compile={'all' if fast else 'none'}"))
        teacher, distiller, _, _ = build_distiller(cfg, cpu)
        run_teacher = prepare_models(cfg, teacher, distiller, cpu)
        images = input_layout(x, fast)
        assert images.is_contiguous(memory_format=torch.channels_last) == fast
        out = distiller(images, y, *run_teacher(images))
        out.loss.backward()
        runs.append((out.loss.detach(), [p.grad for p in distiller.projectors.parameters()]))
    (loss, grads), (fast_loss, fast_grads) = runs
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, fast_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_token_student_built_for_another_input_size_is_refused_in_one_line(tmp_path):
    from hcd.engine.config import load_config
    from hcd.engine.distiller import build_distiller
    (tmp_path / "run.yaml").write_text(TINY_RUN)
    with pytest.raises(ModelError, match=r"^model.student_kwargs: VisionTransformer is built for 56x56 inputs but "
                                         r"data.img_size is 32: set model.student_kwargs.img_size to 32$"):
        build_distiller(load_config(str(tmp_path / "run.yaml"), ("data.img_size=32",)), torch.device("cpu"))
