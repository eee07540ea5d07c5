"""Processes and DeepSpeed: the launcher's environment, the process group, the generated DeepSpeed config and
the engine that wraps the distiller.

A run is one process (we set up a 1-process group, so DeepSpeed never tries MPI discovery), or several under
torchrun or the `deepspeed` launcher (which set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*). Without CUDA,
DS_ACCELERATOR=cpu and gloo are used. DeepSpeed is imported only here and only when a run starts, so bad
input is reported before its import cost and `hcd verify` / `hcd bench` run on machines without it.
"""
import contextlib
import io
import json
import logging
import os
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hcd.engine.config import Config, ConfigError

LAUNCHER_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # we created the process group (so it is destroyed at exit)


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env() -> Dist:
    """Rank, world size and device from the launcher's variables (torchrun, deepspeed), or a 1-process
    setting when none are set. Starts nothing, so bad input can be reported before DeepSpeed is imported."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # A plain `hcd train`: a 1-process group; setting the variables keeps DeepSpeed from MPI discovery.
        defaults = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        for k in LAUNCHER_ENV_KEYS:
            os.environ.setdefault(k, defaults[k])
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, local_rank, device)


@contextmanager
def distributed():
    """process_env() for the duration of a command. DeepSpeed caches its process groups module-wide, so a
    group we created stays up for later calls in the same process (tests, `hcd demo`) and goes at exit."""
    d = process_env()
    try:
        yield d
    finally:
        if d.owns_group:
            import atexit
            atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def barrier() -> None:
    """Wait for every rank, when a process group is up (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def control_group(d: Dist):
    """The group for host-side flags (stop requests): gloo, so a flag agreed there never waits for the GPU's
    queued work; None for one process."""
    if d.world == 1:
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def rank0_print(d: Dist, *args) -> None:
    if d.rank == 0:
        print(*args, flush=True)


def import_deepspeed():
    """Import DeepSpeed on the right accelerator: without CUDA it must be told 'cpu' before import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # torch warns at DeepSpeed's import that CUDA_HOME has no runtime: noise on a CPU machine
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
    if not any(isinstance(f, _NotForUsers) for f in deepspeed.utils.logger.filters):
        deepspeed.utils.logger.addFilter(_NotForUsers())
    # DeepSpeed's ZeRO-3 calls torch.distributed functions that torch has deprecated, once per step
    warnings.filterwarnings("ignore", message=r".* is deprecated\. Please use", category=FutureWarning,
                            module=r"torch\.distributed\.c10d_logger")
    return deepspeed


class _NotForUsers(logging.Filter):
    """DeepSpeed warnings about choices this engine makes on purpose: nothing a user can act on."""
    QUIET = ("You are using ZeRO with an untested optimizer",)  # our torch SGD / AdamW, allowed in the config

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(q in record.getMessage() for q in self.QUIET)


def init_process_group(d: Dist) -> None:
    """Through DeepSpeed (nccl on CUDA, gloo on CPU), unless a group already exists (reused)."""
    deepspeed = import_deepspeed()
    if not dist.is_initialized():
        # DeepSpeed prints "... shm_comm_op built successfully" on stdout from every process: not the user's
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="nccl" if d.device.type == "cuda" else "gloo",
                                       auto_mpi_discovery=False, verbose=False)
        d.owns_group = True


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The generated DeepSpeed config, with `deepspeed.config_file` (if any) merged underneath it."""
    t = cfg.train
    base = {}
    if cfg.deepspeed.config_file:
        p = Path(cfg.deepspeed.config_file)
        if not p.is_file():
            raise ConfigError(f"deepspeed.config_file: file not found: {p}")
        try:
            base = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config_file: {p} is not valid JSON ({e})") from None
        stage = base.get("zero_optimization", {}).get("stage", cfg.deepspeed.zero_stage)
        if stage != cfg.deepspeed.zero_stage:
            raise ConfigError(f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage} but {p} sets stage {stage}")
    if t.precision == "fp16" and cfg.deepspeed.zero_stage > 0:
        # measured on DeepSpeed 0.19.8: its ZeRO optimizers skip an overflowing step before their GradScaler
        # sees it, so the loss scale never drops and every later step is skipped too
        raise ConfigError(f"train.precision: fp16 (autocast) needs deepspeed.zero_stage 0, not "
                          f"{cfg.deepspeed.zero_stage}: DeepSpeed's loss scaler never lowers its scale under ZeRO "
                          "1-3 with autocast; use bf16, or fp16-pure (fp16 weights)")
    zero = dict(base.get("zero_optimization", {}), stage=cfg.deepspeed.zero_stage)
    ds = dict(base)
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,   # our torch SGD/AdamW under ZeRO
        # bf16 / fp16: fp32 weights, BatchNorm and optimizer, the forward under torch.autocast (timm's and
        # OFA-KD's AMP); lower_precision_safe_modules [] keeps gradients reduced in fp32 as DDP does (DeepSpeed's
        # default reduces Linear/Conv gradients in the autocast dtype). *-pure: DeepSpeed's 16-bit modules.
        "torch_autocast": dict({"lower_precision_safe_modules": []}, **base.get("torch_autocast", {}),
                               enabled=t.precision in ("bf16", "fp16"), dtype=t.precision.removesuffix("-pure")),
        "bf16": dict(base.get("bf16", {}), enabled=t.precision == "bf16-pure"),
        # bf16 gradients lose bits when accumulated over micro-batches and ranks: accumulate in fp32 (DeepSpeed
        # 0.19 supports that from ZeRO-1 on; ZeRO-0 with bf16-pure keeps bf16 gradients: prefer ZeRO-1 there)
        "data_types": dict(base.get("data_types", {}), **(
            {"grad_accum_dtype": "fp32"} if t.precision == "bf16-pure" and cfg.deepspeed.zero_stage >= 1 else {})),
        "fp16": dict(base.get("fp16", {}), enabled=t.precision == "fp16-pure"),
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    })
    return ds


class EngineModule(torch.nn.Module):
    """What DeepSpeed wraps: the distiller, returning a plain tuple (loss, logits, parts) that ZeRO-3's
    hooks can see into. The CFM output weights (cfm_weight, cfm_bias) are direct parameters of the distiller,
    so ZeRO-3 gathers them with its forward like any module's (tests/engine/test_distributed.py)."""

    def __init__(self, distiller):
        super().__init__()
        self.distiller = distiller

    @property
    def student(self):
        return self.distiller.student

    def forward(self, images, target, f_t, z_t):
        out = self.distiller(images, target, f_t, z_t)
        return out.loss, out.logits, out.parts


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Student + projectors + CFMs (the teacher is not in `model`). No weight decay on biases and norm
    weights (1-D tensors), as timm and the OFA-KD recipes do."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optim
    # fused: its step takes a device-side found_inf and is then skipped on the device (engine/health.py)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               fused=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=True)


def build_engine(cfg: Config, distiller, d: Dist, lr_lambda=None):
    """deepspeed.initialize over EngineModule(distiller) with our optimizer (and a per-step LambdaLR).
    Starts the process group first (collective: every rank calls it)."""
    ds_config = deepspeed_config(cfg, d.world)
    init_process_group(d)
    deepspeed = import_deepspeed()
    module = EngineModule(distiller)
    scheduler = None if lr_lambda is None else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=build_optimizer(cfg, module), config=ds_config,
                                           lr_scheduler=scheduler, dist_init_required=False)
    match_buffers(engine)
    if engine.torch_autocast_z0_gradscaler is not None:  # fp16 autocast (ZeRO-0): loss scaling by torch
        from hcd.engine.health import guard_scaler
        guard_scaler(engine.torch_autocast_z0_gradscaler)
    return engine


def compute_dtype(engine) -> torch.dtype:
    """The dtype DeepSpeed left the student's weights in, which its inputs are given in: bf16/fp16 in the
    -pure modes (DeepSpeed converted the module), fp32 otherwise (the autocast modes cast inside)."""
    return next(engine.module.student.parameters()).dtype


def autocast_precision(engine) -> str:
    """The train.precision an engine's autocast stands for ("bf16", "fp16"), "" when it has none."""
    if not engine.torch_autocast_enabled():
        return ""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[engine.torch_autocast_dtype()]


def match_buffers(engine) -> None:
    """DeepSpeed (0.19) converts parameters to bf16/fp16 but not buffers, and batch_norm in training mode then
    refuses fp32 running statistics with half weights: in the -pure modes the buffers follow the parameters'
    dtype (the autocast modes keep fp32 parameters, so BatchNorm's statistics stay fp32)."""
    dtype = compute_dtype(engine)
    if dtype != torch.float32:
        for b in engine.module.buffers():
            if b.is_floating_point():
                b.data = b.data.to(dtype)
