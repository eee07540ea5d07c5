"""Teacher/student wrappers and the HCD distiller on tiny timm models at 32x32 (CPU)."""
import pytest
import torch

from hcd.engine.distiller import HCDDistiller, Projector, head_input_widths, projector_channels, projector_width
from hcd.engine.errors import ModelError
from hcd.engine.models import build_student, build_teacher, feature_widths, load_state_dict_file, norm_stats
from hcd.kernels import HCDLossConfig, hcd_loss

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)


def _pair(student="resnet18", stages=(1, 2, 3, 4), num_classes=7):
    s = build_student(student, num_classes, stages)
    mean, std = norm_stats(s.model)
    t = build_teacher("vit_tiny_patch16_224", num_classes, kwargs=TINY_VIT, student_mean=mean, student_std=std)
    return t, s


def test_teacher_outputs_match_plain_forward_and_stay_frozen():
    torch.manual_seed(0)
    t, _ = _pair()
    x = torch.randn(3, 3, 32, 32)
    t.train()  # must not leave eval mode
    assert not t.model.training and not any(p.requires_grad for p in t.parameters())
    f_t, z_t = t(x)
    assert f_t.shape == (3, 48) and z_t.shape == (3, 7) and t.feature_dim == 48
    # z_t from the pre-logits equals the model's own forward on the re-normalised input
    x_t = x * t.scale + t.shift
    torch.testing.assert_close(z_t, t.model(x_t), rtol=1e-5, atol=1e-5)
    assert t.renormalise  # ViT uses 0.5/0.5, ResNet ImageNet stats


def test_teacher_renormalisation_maps_student_input_to_teacher_input():
    t, s = _pair()
    (sm, ss), (tm, ts) = norm_stats(s.model), norm_stats(t.model)
    raw = torch.rand(2, 3, 4, 4)
    as_student = (raw - torch.tensor(sm).view(1, 3, 1, 1)) / torch.tensor(ss).view(1, 3, 1, 1)
    as_teacher = (raw - torch.tensor(tm).view(1, 3, 1, 1)) / torch.tensor(ts).view(1, 3, 1, 1)
    torch.testing.assert_close(as_student * t.scale + t.shift, as_teacher, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,channels", [("resnet18", [64, 128, 256, 512]),
                                           ("mobilenetv2_100", [24, 32, 96, 320])])
def test_student_stage_features(name, channels):
    s = build_student(name, 5, [1, 2, 3, 4])
    logits, feats = s(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5)
    assert [f.shape[1] for f in feats] == channels == s.stage_channels
    assert [f.shape[-1] for f in feats] == [8, 4, 2, 1]


def test_projector_shapes_follow_the_spec():
    assert projector_channels(1, 64, 768) == [128, 256, 768]
    assert projector_channels(3, 256, 768) == [768]
    for stage, c, hw in [(1, 64, 8), (2, 128, 4), (3, 256, 2), (4, 512, 1)]:
        p = Projector(stage, c, 96)
        assert p(torch.randn(2, c, hw, hw)).shape == (2, 96)
    assert isinstance(Projector(4, 512, 96).body, torch.nn.Conv2d)
    # OFA-KD's block: c_in channels up to the last conv1x1, which alone changes the width
    block = Projector(2, 128, 96).body[0]
    convs = [(m.in_channels, m.out_channels, m.groups, m.stride[0]) for m in block if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(128, 128, 128, 2), (128, 128, 1, 1), (128, 128, 128, 1), (128, 256, 1, 1)]
    assert [m.num_features for m in block if isinstance(m, torch.nn.BatchNorm2d)] == [128, 256]


@pytest.mark.parametrize("name,field", [
    ("levit_128", "model.student"),                # a token-sequence family without stage projectors
    ("not_a_model", "model.student"),
    ("bat_resnext26ts", "model.student"),         # a family we do not list
])
def test_unsupported_students_fail_at_construction(name, field):
    with pytest.raises(ModelError, match=rf"^{field}:"):
        build_student(name, 10, [1, 2, 3, 4])


def test_distiller_refuses_stages_the_student_does_not_return():
    t, s = _pair(stages=(3, 4))
    with pytest.raises(ValueError, match="^head.stages"):
        HCDDistiller(s, t.feature_dim, 7, HCDLossConfig(), stages=(1, 2, 3, 4))
    assert HCDDistiller(s, t.feature_dim, 7, HCDLossConfig(), stages=None).stages == [3, 4]


def test_unsupported_teacher_fails_naming_the_family():
    with pytest.raises(ModelError, match="byobnet"):
        build_teacher("bat_resnext26ts", 10)


def test_checkpoints_load_with_weights_only(tmp_path):
    s = build_student("resnet18", 4, [4])
    torch.save({"state_dict": {"module." + k: v for k, v in s.model.state_dict().items()}}, tmp_path / "s.pth")
    s2 = build_student("resnet18", 4, [4], checkpoint=str(tmp_path / "s.pth"))
    for (k, a), b in zip(s.model.state_dict().items(), s2.model.state_dict().values()):
        assert torch.equal(a, b), k
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match="does not fit"):
        build_student("resnet18", 4, [4], checkpoint=str(tmp_path / "bad.pth"))
    torch.save({"obj": object()}, tmp_path / "pickle.pth")  # refused by weights_only
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_state_dict_file(str(tmp_path / "pickle.pth"), "model.teacher_checkpoint")
    with pytest.raises(ModelError, match="not found"):
        load_state_dict_file(str(tmp_path / "missing.pth"), "model.teacher_checkpoint")


@pytest.mark.parametrize("student,stages,hidden", [("resnet18", (1, 2, 3, 4), None),
                                                   ("mobilenetv2_100", (2, 4), 32)])
def test_distiller_forward_backward(student, stages, hidden, monkeypatch):
    import hcd.engine.distiller as distiller
    calls = []
    monkeypatch.setattr(distiller, "hcd_loss", lambda *a, **kw: calls.append(a) or hcd_loss(*a, **kw))
    torch.manual_seed(0)
    t, s = _pair(student, stages)
    cfg = HCDLossConfig(n_sublogits=3, sublogit_kl_weight=2.0, ol_weight=0.5, kd_weight=0.7)
    model = HCDDistiller(s, t.feature_dim, 7, cfg, stages=stages, cfm_hidden=hidden, backend="eager")
    before = {k: v.clone() for k, v in t.state_dict().items()}
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    model.train()
    t.train()
    f_t, z_t = t(x)
    out = model(x, y, f_t, z_t)
    out.loss.backward()
    assert out.logits.shape == (4, 7)
    # the module's total is docs/method.md's total (Losses) recomputed from its unweighted parts
    p = out.parts
    spec = (cfg.ce_weight * (p["ce"] + p["sce"]) + cfg.kd_weight * p["kd"] + cfg.sublogit_kl_weight * p["skl"]
            + cfg.ol_weight * p["ol"])
    torch.testing.assert_close(out.loss.detach(), spec, rtol=1e-6, atol=1e-6)
    assert set(out.parts) >= {"ce", "kd", "sce", "skl", "ol"} | {f"skl{i}" for i in stages}
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "student.model" not in name:  # projectors and CFMs always see a nonzero gradient
            assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in t.parameters())
    for k, v in t.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN statistics and weights untouched
    # one loss call per step, reading the stacked CFM weights as they are; its input widths are what
    # head_input_widths says (the benchmarks' shapes rely on it)
    assert len(calls) == 1
    x_s, x_t, weights, biases = calls[0][:4]
    d_x, d_t = head_input_widths(s.feature_dim, t.feature_dim, hidden)
    assert x_s.shape == (len(stages), 4, d_x) and x_t.shape == (4, d_t)
    assert weights is model.cfm_weight and biases is model.cfm_bias and weights.shape == (len(stages), 21, d_x + d_t)


@pytest.mark.parametrize("hidden", [None, 16])
def test_cfm_weights_start_as_the_per_stage_linears_did(hidden):
    """The stacked CFM output weights draw nn.Linear's default init, stage by stage, in the order the per-stage
    nn.Linear layers did (after the projectors; a hidden layer before its stage's output layer): the same seed
    gives the same initial values as before the stacking, bit for bit."""
    t, s = _pair("resnet18", (3, 4))
    torch.manual_seed(0)
    model = HCDDistiller(s, t.feature_dim, 7, HCDLossConfig(n_sublogits=2), cfm_hidden=hidden, init="torch")
    torch.manual_seed(0)
    d_p = projector_width(s.feature_dim, t.feature_dim)
    [Projector(stage, c, d_p) for stage, c in zip(s.stages, s.stage_channels)]
    for i in range(2):
        if hidden:
            layer = torch.nn.Linear(d_p + t.feature_dim, hidden)
            assert torch.equal(model.cfm_hidden[i][0].weight, layer.weight)
        out = torch.nn.Linear(hidden or d_p + t.feature_dim, 2 * 7)
        assert torch.equal(model.cfm_weight[i], out.weight) and torch.equal(model.cfm_bias[i], out.bias), i


@pytest.mark.parametrize("hidden", [None, 16])
def test_head_init_ofa_is_ofa_kds_init_weights(hidden):
    """head.init: ofa (the default, docs/method.md, Initialisation): projector convs kaiming-normal (fan_out,
    ReLU gain), BN 1/0, every CFM Linear (the stacked output one too) trunc-normal std 0.02 with zero bias;
    the same seed under head.init: torch gives PyTorch's defaults instead."""
    t, s = _pair("resnet18", (2, 4))
    torch.manual_seed(0)
    model = HCDDistiller(s, t.feature_dim, 50, HCDLossConfig(n_sublogits=2), cfm_hidden=hidden)
    torch.manual_seed(0)
    plain = HCDDistiller(s, t.feature_dim, 50, HCDLossConfig(n_sublogits=2), cfm_hidden=hidden, init="torch")
    linears = [(model.cfm_weight, model.cfm_bias)] + [(h[0].weight, h[0].bias) for h in model.cfm_hidden or []]
    for w, b in linears:
        assert torch.all(b == 0) and abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert plain.cfm_bias.abs().max() > 0 and abs(plain.cfm_weight.std().item() - 0.02) > 0.002
    bns = [m for m in model.projectors.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in bns)
    last = model.projectors[-1].body  # stage 4: one conv1x1 with a bias, zeroed
    assert torch.all(last.bias == 0) and plain.projectors[-1].body.bias.abs().max() > 0
    for conv, ref in zip(model.projectors.modules(), plain.projectors.modules()):
        if isinstance(conv, torch.nn.Conv2d):  # kaiming fan_out: std sqrt(2 / (out_channels * k * k)), any groups
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.2), conv
    with pytest.raises(ValueError, match="head.init"):
        HCDDistiller(s, t.feature_dim, 50, HCDLossConfig(n_sublogits=2), init="xavier")


def test_a_checkpoint_with_per_stage_cfm_layers_is_named_as_older_in_one_line(tmp_path):
    """A checkpoint written before the CFM output weights were stacked (cfms.K.out.*) is refused as an older
    hcd's, not as another config's: with the names as saved, and as recovered for checkpoints whose layout
    predates kept shapes (filtered to this model's names by with_legacy_shapes)."""
    from hcd.engine.config import ConfigError
    from hcd.engine.layout import check_layout, parameter_shapes
    t, s = _pair("resnet18", (3, 4))
    now = parameter_shapes(HCDDistiller(s, t.feature_dim, 7, HCDLossConfig(n_sublogits=2)))
    old = {k: v for k, v in now.items() if not k.startswith("cfm_")}
    for i in range(2):
        old.update({f"cfms.{i}.out.weight": [14, 560], f"cfms.{i}.out.bias": [14]})
    for saved in (old, {k: v for k, v in old.items() if k in now}):
        with pytest.raises(ConfigError) as err:
            check_layout({"parameters": saved}, {"parameters": now}, tmp_path, "--checkpoint", hint="; or else")
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"--checkpoint: {tmp_path} was written by an older hcd")
        assert "cfms.K.out" in message and "cfm_weight" in message and message.endswith("; or else")
    # a checkpoint of this version with another n is still another config's model
    with pytest.raises(ConfigError, match="cfm_weight is \\(2, 14, 560\\) here, \\(2, 20, 560\\) in the checkpoint"):
        check_layout({"parameters": dict(now, cfm_weight=[2, 20, 560])}, {"parameters": now}, tmp_path)


def test_feature_widths_without_weights():
    """(D_s, D_t) from meta-device models equal those of the real (allocated) models."""
    t, s = _pair("mobilenetv2_100", (1, 2, 3, 4))
    assert feature_widths("vit_tiny_patch16_224", "mobilenetv2_100", 7, TINY_VIT) == (s.feature_dim, t.feature_dim)
    assert feature_widths("deit_tiny_patch16_224", "resnet18", 1000) == (512, 192)
    with pytest.raises(ModelError, match="model.student: unknown timm model 'resnet_nope'"):
        feature_widths("deit_tiny_patch16_224", "resnet_nope", 1000)


def test_feature_widths_fall_back_to_cpu_where_meta_fails(monkeypatch):
    """timm < ~1.0.21 reads drop-path rates out of a tensor while building ViT/DeiT/Swin: impossible on meta."""
    import hcd.engine.models as models
    real = models._build_timm
    seen = []

    def old_timm(*args, **kwargs):
        on_meta = torch.empty(0).device.type == "meta"
        seen.append(on_meta)
        if on_meta:
            raise NotImplementedError("Cannot copy out of meta tensor; no data!")
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "_build_timm", old_timm)
    assert feature_widths("deit_tiny_patch16_224", "resnet18", 10) == (512, 192)
    assert seen == [True, False, True, False]  # tried on meta, then built on the CPU, for each model
