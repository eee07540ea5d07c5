"""The training steps `hcd bench` times, each a zero-argument callable running one optimizer step on a
synthetic batch already on the device (no loader in the timing).

- engine: the step users run. The config is a shipped ImageNet config (STEP_CONFIG; on CPU shrunk by
  `--set`-style overrides to a tiny teacher), the models come from build_distiller + prepare_models, the
  DeepSpeed engine from build_engine with the trainer's LR schedule, and each call is
  hcd.engine.trainer._micro_step on a minimal Run: the bench drives the trainer's own micro-step (looked
  up at call time), so what it times cannot drift from what `hcd train` runs.
- kd: the same machinery (config, prepared models, DeepSpeed engine, _micro_step) with `method: kd` (the
  student alone, CE + KD through hcd.kernels.student_loss): what HCD costs over KD as users run KD.
- vit recipe: the engine step of the other direction and DeiT's recipe (VIT_RECIPE_CONFIG: ConvNeXt-T ->
  DeiT-T): each step first runs the train loader's batch augmentation (random erasing, Mixup / CutMix:
  BatchAugment.apply) on a copy of the batch, then _micro_step with its soft targets, the EMA update included.
- reference: the loop a user would otherwise write (OFA-KD style): the same models and batch, the eager
  reference losses, torch.autocast bf16 on CUDA, NCHW, no compile, plain (not fused) torch.optim.SGD,
  loss.backward(), no DeepSpeed; cuDNN autotuning on, as timm's train.py (OFA-KD's base) sets it.
"""
import contextlib
import dataclasses
import io
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from hcd.engine import trainer
from hcd.engine.bench.shapes import CONFIG_ROOT
from hcd.engine.config import Config, load_config

STEP_CONFIG = "imagenet/swin_tiny-resnet18.yaml"   # Swin-T -> ResNet18, 224 px, bf16 autocast, ZeRO-1
# Every device: a random teacher (a speed benchmark needs no weights) and the repository's DeepSpeed JSON.
COMMON_OVERRIDES = ("model.teacher_checkpoint=null", "data.loader=synthetic", "train.grad_accum=1",
                    f"deepspeed.config_file={CONFIG_ROOT / 'deepspeed' / 'zero1.json'}")
CUDA_OVERRIDES = ("data.batch_size=128",)
CPU_OVERRIDES = ("model.teacher=vit_tiny_patch16_224",
                 "model.teacher_kwargs={img_size: 32, patch_size: 4, depth: 4}",
                 "model.num_classes=10", "data.img_size=32", "data.batch_size=16",
                 "train.precision=fp32", "train.compile=none")


VIT_RECIPE_CONFIG = "imagenet/convnext_tiny-deit_tiny.yaml"  # ConvNeXt-T -> DeiT-T: erasing, Mixup/CutMix, EMA
VIT_CPU_OVERRIDES = ("model.student_kwargs={img_size: 32, patch_size: 4, embed_dim: 48, depth: 6, num_heads: 2}",)


def step_overrides(device: torch.device, config: str = STEP_CONFIG) -> Tuple[str, ...]:
    cpu = CPU_OVERRIDES + (VIT_CPU_OVERRIDES if config == VIT_RECIPE_CONFIG else ())
    return COMMON_OVERRIDES + (CUDA_OVERRIDES if device.type == "cuda" else cpu)


def step_config(device: torch.device, config: str = STEP_CONFIG) -> Config:
    return load_config(str(CONFIG_ROOT / config), step_overrides(device, config))


def synthetic_batch(cfg: Config, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking float32 NCHW images and labels on the device, as a loader hands them over."""
    g = torch.Generator().manual_seed(cfg.seed)
    size, b = cfg.data.img_size, cfg.data.batch_size
    images = torch.randn(b, 3, size, size, generator=g).to(device)
    return images, torch.randint(0, cfg.model.num_classes, (b,), generator=g).to(device)


def _models(cfg: Config, device):
    """(teacher, distiller) exactly as the trainer builds them; the random teacher's warning (meant for a
    training run) is left out of the bench's output."""
    from hcd.engine.distiller import build_distiller
    with contextlib.redirect_stdout(io.StringIO()):
        teacher, distiller, _, _ = build_distiller(cfg, device)
    return teacher, distiller


def engine_run(cfg: Config, kind: str = "hcd", teacher_fn: Optional[Callable] = None) -> "trainer.Run":
    """A Run holding what _micro_step uses (engine, prepared teacher, health, window, channels_last, cfg);
    the loader, saver and log stay None: the step never touches them. `teacher_fn`: reuse a prepared
    (compiled) teacher of the same config instead of compiling another one."""
    from hcd.engine.distributed import build_engine, process_env
    from hcd.engine.ema import build_ema
    from hcd.engine.health import StepHealth
    from hcd.engine.metrics import MetricWindow
    from hcd.engine.schedule import make_lr_lambda
    from hcd.engine.speed import prepare_models, resolved
    d = process_env()
    teacher, distiller = _models(dataclasses.replace(cfg, method=kind), d.device)
    prepared = prepare_models(cfg, teacher, distiller, d.device)  # compiles lazily: unused when reused
    ema = build_ema(cfg, distiller.student.model, d.device)  # train.ema_decay's, as the trainer builds it
    engine = build_engine(cfg, distiller, d, make_lr_lambda(cfg.schedule, cfg.optim.lr, 100, 10 ** 4))
    engine.train()
    return trainer.Run(cfg, d, Path("."), engine, teacher_fn or prepared, None, None, None, None,
                       MetricWindow(cfg.data.batch_size), 10 ** 6, trainer.TrainState(),
                       health=StepHealth(d.device), channels_last=resolved(cfg, d.device)[0], ema=ema)


def micro_step_fn(run: "trainer.Run", images, labels) -> Callable[[], None]:
    """One optimizer step: the trainer's own _micro_step (looked up at each call) with grad_accum 1, then
    run.micro reset as the trainer's _optimizer_step_done resets it (logging and stop checks left out)."""
    def step():
        trainer._micro_step(run, images, labels)
        run.micro = 0
    return step


def augmented_step_fn(run: "trainer.Run", images, labels) -> Callable[[], None]:
    """micro_step_fn behind the train loader's batch augmentation (the run config's data.reprob, mixup,
    cutmix: BatchAugment.apply) on a copy of the batch. Left out: the loader wrapper's per-batch RNG seeding
    (rng.seeded_globals, ~0.2 ms of host time per batch on CPU). run.state.step stays 0, so every EMA update
    is the first one's (decay 0, a copy): the same work as any later update."""
    from hcd.engine.data.batch_aug import batch_augment
    aug = batch_augment(run.cfg, None, 0, images.device)

    def step():
        x, target = aug.apply(images.clone(), labels)
        trainer._micro_step(run, x, target)
        run.micro = 0
    return step


def reference_step(cfg: Config, images, labels) -> Callable[[], None]:
    """The reference loop's step (module docstring) with the same models (same seed) and batch."""
    cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, backend="eager"))
    device = images.device
    teacher, distiller = _models(cfg, device)
    distiller.to(device).train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    o = cfg.optim
    opt = torch.optim.SGD(distiller.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cuda = device.type == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            f_t, z_t = teacher(images)
            loss = distiller(images, labels, f_t, z_t).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def release(run: Optional["trainer.Run"] = None) -> None:
    """Free a row's models before the next row is built (DeepSpeed's engine holds flat buffers)."""
    if run is not None:
        run.engine.destroy()
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
