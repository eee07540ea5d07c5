"""build_loaders: the one entry point of every loader; picks DALI, torch or synthetic (`data.loader`)."""
import importlib.util

import torch

from hcd.engine.config import ConfigError, DataConfig
from hcd.engine.data.auto_augment import parse_rand_augment
from hcd.engine.data.base import ImageSpec
from hcd.engine.data.folder import load_split


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


def choose_backend(loader: str) -> str:
    if loader == "auto":
        return "dali" if dali_available() and torch.cuda.is_available() else "torch"
    if loader == "dali" and not dali_available():
        raise ConfigError("data.loader: 'dali' but NVIDIA DALI is not installed "
                          "(pip install nvidia-dali-cuda120, or set data.loader: torch)")
    if loader not in ("dali", "torch", "synthetic"):
        raise ConfigError(f"data.loader: {loader!r} is not one of 'auto', 'dali', 'torch', 'synthetic'")
    return loader


def build_loaders(data_cfg: DataConfig, mean, std, rank: int = 0, world_size: int = 1, seed: int = 0,
                  device=torch.device("cpu"), num_classes=None, dtype=torch.float32):
    """(train_loader, val_loader) for this rank; see hcd.engine.data.base for the loader interface.

    mean, std: 3 numbers on the 0-1 scale (timm's pretrained_cfg). With DALI on a CUDA device the
    pipeline decodes on the GPU ("mixed"); on a CPU device it runs DALI's CPU operators. `synthetic` reads
    no files and draws `num_classes` class patterns (tests and benchmarks). `dtype`: the images' dtype (a
    16-bit run's compute dtype; the synthetic loader always gives float32).
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
    backend = choose_backend(data_cfg.loader)
    if backend == "synthetic":
        from hcd.engine.data.synthetic import build_synthetic_loaders
        return build_synthetic_loaders(data_cfg, mean, std, rank=rank, world_size=world_size, seed=seed,
                                       device=device, num_classes=num_classes)
    if backend == "dali":
        from hcd.engine.data.dali import DaliLoader as Loader
    else:
        from hcd.engine.data.torch import TorchLoader as Loader
    train = load_split(data_cfg.root, data_cfg.train_dir, data_cfg.train_list)
    val = load_split(data_cfg.root, data_cfg.val_dir, data_cfg.val_list, classes=train.classes)
    spec = ImageSpec(data_cfg.img_size, data_cfg.crop_pct, tuple(map(float, mean)), tuple(map(float, std)),
                     data_cfg.channels_last, data_cfg.train_interpolation, data_cfg.auto_augment)
    if spec.auto_augment and backend == "dali":
        parse_rand_augment(spec.auto_augment)  # what DALI can express (ConfigError otherwise), before any build
    common = dict(num_workers=data_cfg.num_workers, rank=rank, world_size=world_size, seed=seed,
                  on_corrupt=data_cfg.on_corrupt, device=torch.device(device), dtype=dtype)
    train_loader = Loader(train, spec, train=True, batch_size=data_cfg.batch_size,
                          drop_last=data_cfg.last_batch == "drop", **common)
    val_loader = Loader(val, spec, train=False, batch_size=data_cfg.val_batch_size or data_cfg.batch_size,
                        drop_last=False, **common)
    return train_loader, val_loader
