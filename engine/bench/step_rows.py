"""Whole training steps for `hcd bench`: teacher forward + student forward/backward + every HCD head +
optimizer step, on synthetic batches already on the device (no loader in the timing).

Rows: the engine's path (backend auto: fused on CUDA), the same step with the eager reference losses, and a
plain KD step (student CE + KD only) with the same models — "vs KD" is what HCD costs over KD.
"""
from dataclasses import dataclass
from typing import Callable, List

import torch

from hcd.engine.bench.timing import time_ms
from hcd.engine.distiller import HCDDistiller
from hcd.engine.models import build_student, build_teacher, norm_stats
from hcd.kernels import HCDLossConfig, student_loss


@dataclass(frozen=True)
class StepSetup:
    teacher: str
    student: str
    img_size: int
    batch: int
    num_classes: int
    teacher_kwargs: tuple = ()


GPU_SETUP = StepSetup("swin_tiny_patch4_window7_224", "resnet18", 224, 128, 1000)
CPU_SETUP = StepSetup("vit_tiny_patch16_224", "resnet18", 32, 32, 10,
                      (("img_size", 32), ("patch_size", 4), ("depth", 4)))


def build_step(setup: StepSetup, device, backend: str, kind: str = "hcd") -> Callable[[], None]:
    """A closure running one optimizer step of `kind` ("hcd" or "kd") with the given loss backend."""
    torch.manual_seed(0)
    student = build_student(setup.student, setup.num_classes, [1, 2, 3, 4])
    mean, std = norm_stats(student.model)
    teacher = build_teacher(setup.teacher, setup.num_classes, kwargs=dict(setup.teacher_kwargs),
                            student_mean=mean, student_std=std).to(device)
    cfg = HCDLossConfig(sublogit_kl_weight=1.0)
    model = HCDDistiller(student, teacher.feature_dim, setup.num_classes, cfg, backend=backend).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = model.parameters() if kind == "hcd" else student.parameters()
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(setup.batch, 3, setup.img_size, setup.img_size, generator=g).to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, setup.num_classes, (setup.batch,), generator=g).to(device)
    autocast = dict(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        f_t, z_t = teacher(images)
        with torch.autocast(**autocast):
            if kind == "hcd":
                loss = model(images, target, f_t, z_t).loss
            else:
                logits, _ = student(images)
                loss = student_loss(logits, z_t.to(logits.dtype), target, cfg, backend=backend)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_rows(device, quick=False) -> List[dict]:
    setup = GPU_SETUP if device.type == "cuda" else CPU_SETUP
    fused = "auto"  # the engine's own choice: triton on CUDA, eager on CPU
    times = {}
    for name, backend, kind in (("hcd engine", fused, "hcd"), ("hcd eager", "eager", "hcd"), ("kd engine", fused, "kd")):
        times[name] = time_ms(build_step(setup, device, backend, kind), device, quick=quick)
    label = f"{setup.teacher.split('_')[0]}->{setup.student}@{setup.img_size}/B{setup.batch}"
    return [{"name": f"{name} {label}", "setup": setup.__dict__ | {"teacher_kwargs": dict(setup.teacher_kwargs)},
             "kind": name, "ms": ms,
             "vs_eager": times["hcd eager"] / ms if name == "hcd engine" else None,
             "vs_kd": ms / times["kd engine"] if name.startswith("hcd") else None}
            for name, ms in times.items()]
