"""The GPU head shapes come from the shipped configs' models."""
from hcd.engine.bench.shapes import config_widths, configs_for, gpu_head_shapes, headline_shape


def test_head_shapes_follow_the_shipped_configs():
    """Dp/Dt of every shipped CIFAR-100 / ImageNet config, as the models' widths give them (D_p = max(D_s, D_t))."""
    widths = {w.config: (w.C, w.Dp, w.Dt) for w in config_widths()}
    assert widths == {"cifar100/mixer_b16-resnet18.yaml": (100, 768, 768),       # Mixer-B/16 768, ResNet18 512
                      "cifar100/resnet50-deit_tiny.yaml": (100, 2048, 2048),     # ResNet50 2048, DeiT-T 192
                      "cifar100/resnet50-swin_nano.yaml": (100, 2048, 2048),     # Swin-N 512
                      "cifar100/swin_tiny-mobilenetv2.yaml": (100, 1280, 768),   # MobileNetV2 1280
                      "cifar100/swin_tiny-resnet18.yaml": (100, 768, 768),
                      "cifar100/vit_small-resnet18.yaml": (100, 512, 384),        # ViT-S 384
                      "imagenet/convnext_tiny-deit_tiny.yaml": (1000, 768, 768),  # ConvNeXt-T 768
                      "imagenet/deit_tiny-resnet18.yaml": (1000, 512, 192),       # DeiT-T 192
                      "imagenet/swin_tiny-resnet18.yaml": (1000, 768, 768)}
    head = headline_shape()
    assert (head.B, head.C, head.n, head.Dp, head.Dt) == (256, 1000, 4, 768, 768)
    assert all(s.frozen_teacher_feature for s in gpu_head_shapes())  # as in training: no dX for x_teacher
    assert configs_for(head) == ["imagenet/convnext_tiny-deit_tiny.yaml", "imagenet/swin_tiny-resnet18.yaml"]
    cifar = [s for s in gpu_head_shapes(ns=(4,)) if s.C == 100]
    assert {(s.B, s.Dp, s.Dt) for s in cifar} == {(128, 768, 768), (128, 1280, 768), (128, 512, 384),
                                                  (128, 2048, 2048)}
    assert configs_for(next(s for s in cifar if s.Dp == 768)) == ["cifar100/mixer_b16-resnet18.yaml",
                                                                  "cifar100/swin_tiny-resnet18.yaml"]
