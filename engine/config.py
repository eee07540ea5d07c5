"""One typed dataclass tree for a run, loaded from YAML with `--set dotted.key=value` overrides.

YAML files only set fields: an unknown key or a wrong type raises ConfigError naming the key path.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from hcd.engine.config_tree import ConfigError, build, merge, parse_override, set_dotted
from hcd.engine.loss_config import METHODS, LossConfig


@dataclass
class ModelConfig:
    teacher: str = "vit_tiny_patch16_224"      # any timm name of a supported teacher family
    student: str = "resnet18"                  # a timm name of a supported CNN or token-sequence student family
    teacher_kwargs: dict = field(default_factory=dict)   # extra timm.create_model kwargs (img_size, depth...)
    student_kwargs: dict = field(default_factory=dict)
    teacher_checkpoint: Optional[str] = None   # .pt/.pth/.safetensors state dict for the teacher
    student_checkpoint: Optional[str] = None   # optional initial weights for the student
    pretrained: bool = False                   # use timm's hub weights (users' machines only)
    num_classes: int = 1000


@dataclass
class DataConfig:
    root: str = "data/imagenet"        # folder with train/ and val/ sub-folders of class folders
    train_dir: str = "train"
    val_dir: str = "val"
    train_list: Optional[str] = None   # optional file list "relative/path label" per line
    val_list: Optional[str] = None
    loader: Literal["auto", "dali", "torch", "synthetic"] = "auto"   # synthetic: random tensors (benchmarks)
    batch_size: int = 64               # per rank
    val_batch_size: Optional[int] = None
    num_workers: int = 4               # DataLoader workers / DALI threads
    img_size: int = 224
    crop_pct: float = 0.875            # val: resize shorter side to img_size / crop_pct, then center crop
    train_interpolation: Literal["random", "bilinear", "bicubic"] = "random"  # train resize; random: bilinear
                                       # or bicubic per image (timm's, OFA-KD's --train-interpolation); val: bilinear
    channels_last: bool = False
    last_batch: Literal["drop", "partial"] = "drop"   # train; val always keeps the partial last batch
    on_corrupt: Literal["error", "skip"] = "error"
    synthetic_train_size: int = 512    # loader: synthetic -- samples per epoch (all ranks together)
    synthetic_val_size: int = 128
    # Train augmentation beyond crop + flip (0 / null: off). DeiT's recipe: auto_augment rand-m9-mstd0.5-inc1,
    # reprob 0.25, mixup 0.8, cutmix 1.0, mixup_prob 1.0, mixup_switch_prob 0.5 (README, Configs)
    auto_augment: Optional[str] = None  # timm's policy string (torch loader: any; DALI: 'rand-...' only)
    reprob: float = 0.0                # random erasing probability per image (timm's, on the device)
    mixup: float = 0.0                 # Mixup's Beta alpha (> 0 enables it)
    cutmix: float = 0.0                # CutMix's Beta alpha (> 0 enables it)
    mixup_prob: float = 1.0            # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5     # with both on: probability of CutMix instead of Mixup


@dataclass
class HeadConfig:
    stages: list = field(default_factory=lambda: [1, 2, 3, 4])   # S: student stages with a CFM head
    cfm_hidden: Optional[int] = None   # None: one Linear; H: Linear -> ReLU -> Linear(H -> n*C)
    backend: Literal["auto", "eager", "compile", "triton"] = "auto"
    init: Literal["ofa", "torch"] = "ofa"   # projector/CFM init: OFA-KD's init_weights, or PyTorch's defaults


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1                    # for the global batch of the recipe; not rescaled automatically
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    """timm's schedulers as OFA-KD's train.py builds them (engine/schedule.py; README, "Schedule")."""
    name: Literal["cosine", "step", "constant"] = "cosine"
    update: Literal["epoch", "step"] = "epoch"  # epoch: the LR changes at epoch ends (timm's t_in_epochs, as
                                       # OFA-KD); step: every optimizer step, lengths in steps (short schedules)
    warmup_epochs: float = 3.0         # linear from warmup_lr; warm-up counts within train.epochs (no prefix)
    warmup_lr: float = 1.0e-4          # the absolute LR warm-up starts from (OFA-KD's --warmup-lr)
    min_lr: float = 1.0e-6             # cosine: the LR it decays to at train.epochs (OFA-KD's --min-lr)
    step_epochs: int = 30              # step: multiply by gamma every step_epochs (timm's decay_t), counted
    gamma: float = 0.1                 # from the start of training (timm's decay_rate)


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: Optional[int] = None    # optional cap on optimizer steps
    grad_accum: int = 1
    grad_clip: float = 0.0             # 0 disables clipping
    precision: Literal["fp32", "bf16", "fp16", "bf16-pure", "fp16-pure"] = "fp32"  # bf16/fp16: fp32 weights
                                       # and BatchNorm, autocast compute; *-pure: DeepSpeed's 16-bit weights
    log_every: int = 20                # metrics reduced (host sync) every N steps
    eval_every: int = 1                # epochs
    max_nonfinite: int = 10            # abort after this many non-finite losses in a row
    teacher_epochs: int = 0            # demo only: train the teacher from scratch first
    stop_at_step: Optional[int] = None  # stop (checkpoint, exit 0) after this optimizer step without changing
                                        # the schedule: a pre-emption drill; continue with --resume
    export: bool = True                # write the student as safetensors + timm pretrained_cfg at the end
    save_every_steps: Optional[int] = None  # also checkpoint every N optimizer steps inside epochs (a hard
                                            # crash then loses at most N steps); epoch ends always checkpoint
    channels_last: Optional[bool] = None    # NHWC student, projectors, teacher and inputs; null: on CUDA
    compile: Optional[Literal["none", "teacher", "student", "all"]] = None  # torch.compile; null: teacher on CUDA
    dist_bn: Literal["reduce", "broadcast", "none"] = "reduce"  # BatchNorm statistics over ranks before every
                                        # eval, checkpoint and export: averaged, rank 0's, or each rank's own
    sync_bn: bool = False               # SyncBatchNorm in training (CUDA, several ranks)
    cuda_graph_loss: bool = False          # replay hcd_loss's forward and backward from CUDA graphs (CUDA only)
    ema_decay: Optional[float] = None   # EMA of the student's weights (timm's ModelEmaV3 decay, e.g. 0.9998),
                                        # evaluated and exported beside them (engine/ema.py); null or 0: off
    ema_warmup: bool = False            # ramp the EMA decay up from 0 over the first steps (timm's use_warmup)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    config_file: Optional[str] = None  # a DeepSpeed JSON merged under the generated config


@dataclass
class Config:
    seed: int = 0
    out: str = "runs/default"
    method: Literal[METHODS] = "hcd"   # what distils (docs/method.md, Baselines)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


# Keys older hcd versions wrote into a run's config.yaml, with what replaced them: one line naming both
# instead of "unknown key" (not converted: the schedule they belonged to is gone, README "Schedule").
RETIRED = {"schedule.warmup_start_factor": "replaced by schedule.warmup_lr, the absolute LR warm-up starts "
           "from (the old factor x optim.lr); the schedule is now timm's (README, Schedule)"}


def _refuse_retired(data: dict, overrides: tuple):
    for dotted, why in RETIRED.items():
        node = data
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None or any(parse_override(t)[0] == dotted for t in overrides):
            raise ConfigError(f"{dotted}: {why}")


def load_config(path: Optional[str] = None, overrides: tuple = ()) -> Config:
    """Defaults <- YAML file <- overrides ('a.b=value' strings). Raises ConfigError on any problem."""
    tree, data = dataclasses.asdict(Config()), {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    _refuse_retired(data, overrides)
    merge(Config, tree, data)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(Config, tree, key, value)
    cfg = build(Config, tree)
    validate(cfg)
    return cfg


def validate(cfg: Config):
    """Cross-field checks that single types cannot express."""
    def need(ok, path, msg):
        if not ok:
            raise ConfigError(f"{path}: {msg}")
    need(cfg.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {cfg.data.batch_size}")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(cfg.data.img_size >= 8, "data.img_size", f"must be >= 8, got {cfg.data.img_size}")
    need(0 < cfg.data.crop_pct <= 1, "data.crop_pct", "must be in (0, 1]")
    need(cfg.model.num_classes >= 2, "model.num_classes", "must be >= 2")
    need(len(cfg.head.stages) > 0 and all(isinstance(s, int) and 1 <= s <= 4 for s in cfg.head.stages)
         and list(cfg.head.stages) == sorted(set(cfg.head.stages)),
         "head.stages", f"must be distinct integers in 1..4 in increasing order (the student returns its stage "
         f"features in network order), got {cfg.head.stages}")
    o = cfg.loss.ofa
    need(o.stage_eps is None or (len(o.stage_eps) == len(cfg.head.stages) and all(
        isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0 for e in o.stage_eps)),
         "loss.ofa.stage_eps", f"must be null or one number > 0 per head.stages entry ({len(cfg.head.stages)}), "
         f"got {o.stage_eps}")
    for section, name in (("dkd", "temperature"), ("dist", "temperature"), ("ofa", "temperature"), ("ofa", "eps"),
                          ("ofa", "logits_eps")):
        value = getattr(getattr(cfg.loss, section), name)
        need(value > 0, f"loss.{section}.{name}", f"must be > 0, got {value}")
    need(cfg.loss.dkd.warmup_epochs >= 0, "loss.dkd.warmup_epochs", "must be >= 0")
    need(cfg.head.cfm_hidden is None or cfg.head.cfm_hidden >= 1, "head.cfm_hidden", "must be >= 1 or null")
    need(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(len(cfg.optim.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                           for b in cfg.optim.betas),
         "optim.betas", f"must be two numbers in [0, 1), got {cfg.optim.betas}")
    need(cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
    need(cfg.schedule.step_epochs >= 1, "schedule.step_epochs", "must be >= 1")
    need(cfg.train.epochs >= 1, "train.epochs", f"must be >= 1, got {cfg.train.epochs}")
    need(cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps", "must be >= 1 or null")
    need(cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(cfg.train.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    need(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    need(cfg.train.eval_every >= 1, "train.eval_every", "must be >= 1")
    need(cfg.train.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
    need(cfg.train.stop_at_step is None or cfg.train.stop_at_step >= 1, "train.stop_at_step", "must be >= 1 or null")
    need(cfg.train.save_every_steps is None or cfg.train.save_every_steps >= 1, "train.save_every_steps",
         "must be >= 1 or null")
    need(cfg.data.synthetic_train_size >= 1, "data.synthetic_train_size", "must be >= 1")
    need(cfg.data.synthetic_val_size >= 1, "data.synthetic_val_size", "must be >= 1")
    _validate_batch_augment(cfg.data, need)
    need(cfg.data.val_batch_size is None or cfg.data.val_batch_size >= 1, "data.val_batch_size", "must be >= 1 or null")
    need(cfg.optim.momentum >= 0, "optim.momentum", "must be >= 0")
    need(cfg.schedule.warmup_lr >= 0, "schedule.warmup_lr", "must be >= 0")
    need(cfg.schedule.min_lr >= 0, "schedule.min_lr", "must be >= 0")
    need(0 < cfg.schedule.gamma <= 1, "schedule.gamma", "must be in (0, 1]")
    need(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0..3, got {cfg.deepspeed.zero_stage}")
    need(not (cfg.train.compile in ("student", "all") and cfg.deepspeed.zero_stage == 3), "train.compile",
         f"{cfg.train.compile!r} with deepspeed.zero_stage 3: ZeRO-3's parameter-gathering hooks make torch.compile "
         "recompile past its limit and fall back to eager; compile 'teacher' only, or use ZeRO-1/2")
    need(not (cfg.train.cuda_graph_loss and cfg.deepspeed.zero_stage == 3), "train.cuda_graph_loss",
         "with deepspeed.zero_stage 3: ZeRO-3 re-gathers the CFM weights into new storage around every forward, "
         "which a captured graph cannot follow; use ZeRO-0/1/2")
    need(not (cfg.train.cuda_graph_loss and cfg.method != "hcd"), "train.cuda_graph_loss",
         f"captures the HCD loss call (method 'hcd'), not method {cfg.method!r}")
    ema = cfg.train.ema_decay
    need(ema is None or 0 <= ema < 1, "train.ema_decay", f"must be in (0, 1), or null / 0 for off, got {ema}")
    need(not (ema and cfg.deepspeed.zero_stage == 3), "train.ema_decay",
         "with deepspeed.zero_stage 3: ZeRO-3 partitions the student's weights over the ranks, and an EMA of them "
         "would gather the whole student every step; use ZeRO-0/1/2, or turn the EMA off (null)")
    need(not (cfg.train.ema_warmup and not ema), "train.ema_warmup", "needs train.ema_decay (the EMA is off)")


def _validate_batch_augment(d: DataConfig, need):
    for name in ("mixup", "cutmix"):
        need(getattr(d, name) >= 0, f"data.{name}", f"must be >= 0 (a Beta alpha; 0: off), got {getattr(d, name)}")
    for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
        need(0 <= getattr(d, name) <= 1, f"data.{name}", f"must be in [0, 1], got {getattr(d, name)}")
    if d.mixup > 0 or d.cutmix > 0:  # timm's Mixup (mode 'batch') mixes sample i with B - 1 - i
        need(d.batch_size % 2 == 0, "data.batch_size", f"must be even with data.mixup/cutmix on (timm's batch "
             f"Mixup pairs the samples), got {d.batch_size}")
        need(d.last_batch == "drop", "data.last_batch", "must be 'drop' with data.mixup/cutmix on (an odd "
             "partial last batch cannot be paired)")
    need(d.auto_augment is None or (isinstance(d.auto_augment, str) and d.auto_augment.split("-")[0] in AA_POLICIES),
         "data.auto_augment", f"must be null or a timm policy string starting with one of {', '.join(AA_POLICIES)} "
         f"(e.g. 'rand-m9-mstd0.5-inc1'), got {d.auto_augment!r}")


AA_POLICIES = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")  # timm's auto_augment families


# Fields that name files or folders: a saved config holds them absolute, so it works from any directory
# (data.train_list / val_list stay as given: they are relative to data.root).
PATH_FIELDS = (("data", "root"), ("model", "teacher_checkpoint"), ("model", "student_checkpoint"),
               ("deepspeed", "config_file"), (None, "out"))


def with_absolute_paths(cfg: Config) -> Config:
    """A copy of cfg whose PATH_FIELDS are absolute (~ expanded); None stays None."""
    tree = dataclasses.asdict(cfg)
    for section, name in PATH_FIELDS:
        node = tree if section is None else tree[section]
        if node[name] is not None:
            node[name] = os.path.abspath(os.path.expanduser(node[name]))
    return build(Config, tree)


def dump_config(cfg: Config, path) -> None:
    """Write the resolved config as YAML (the run folder's config.yaml), its paths absolute."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(with_absolute_paths(cfg)), sort_keys=False))


def check_paths(cfg: Config) -> None:
    """The first file or folder the config names that does not exist, as a one-line error naming its field:
    checked before any model or loader is built (minutes of start-up on a real job)."""
    from hcd.engine.errors import DataError, ModelError
    if cfg.data.loader != "synthetic":
        root = Path(cfg.data.root).expanduser()
        for folder, listed in ((cfg.data.train_dir, cfg.data.train_list), (cfg.data.val_dir, cfg.data.val_list)):
            path = root / Path(listed).expanduser() if listed else root / folder
            if not path.exists():
                raise DataError(f"{path}: {'file list' if listed else 'dataset folder'} not found")
    for name in ("teacher_checkpoint", "student_checkpoint"):
        path = getattr(cfg.model, name)
        if path is not None and not Path(path).expanduser().is_file():
            raise ModelError(f"model.{name}: checkpoint file not found: {path}")
