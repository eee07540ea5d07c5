"""The switches that make a step fast on a GPU, each also runnable on CPU: NHWC memory format (channels_last)
for the input batch and the teacher's weights (the student's activations follow the input; its weights stay
contiguous, since DeepSpeed keeps them as views of flat buffers and broadcasts them as bytes, and cuDNN picks
NHWC kernels from an NHWC input anyway); cuDNN autotuning; the frozen teacher's
weights kept in the run's 16-bit dtype (a frozen model needs no fp32 master copy); torch.compile of the
teacher and/or the student side (student and projectors, compiled in place before DeepSpeed wraps them, so
parameter names, checkpoints and exports do not change); the loss call replayed from CUDA graphs
(train.cuda_graph_loss, engine/loss_graph.py; refused off CUDA here, at build time)."""
from typing import Tuple

import torch

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolved(cfg, device: torch.device) -> Tuple[bool, str]:
    """(channels_last, what to compile) with the CUDA defaults for unset (null) fields."""
    t, cuda = cfg.train, device.type == "cuda"
    channels_last = cuda if t.channels_last is None else t.channels_last
    what = ("teacher" if cuda else "none") if t.compile is None else t.compile
    return channels_last, what


def prepare_models(cfg, teacher, distiller, device: torch.device):
    """Apply the switches to the models in place; returns the callable that runs the teacher."""
    channels_last, what = resolved(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune each convolution once
    if cfg.train.precision in HALF:
        teacher.to(HALF[cfg.train.precision])
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    if cfg.train.cuda_graph_loss:
        from hcd.engine.loss_graph import graphed_loss
        distiller.loss_fn = graphed_loss(distiller, device)
    if what in ("student", "all"):
        distiller.student.compile()
        for projector in distiller.projectors:
            projector.compile()
    return torch.compile(teacher) if what in ("teacher", "all") else teacher


def input_layout(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.dim() == 4 else images
