"""Data loading: DALI pipelines, torch fallback, synthetic batches, the embedded demo dataset, data-check.

The builders are imported lazily so `hcd data-check` and `hcd.engine.data.demo` do not pay for torch.
"""


def build_loaders(data_cfg, mean, std, rank=0, world_size=1, seed=0, device=None, num_classes=None, dtype=None):
    """(train_loader, val_loader); see hcd.engine.data.build.build_loaders."""
    import torch as _torch  # underscore: `hcd.engine.data.torch` (the submodule) must not be shadowed
    from hcd.engine.data.build import build_loaders as _build
    return _build(data_cfg, mean, std, rank=rank, world_size=world_size, seed=seed,
                  device=_torch.device("cpu") if device is None else device, num_classes=num_classes,
                  dtype=_torch.float32 if dtype is None else dtype)


def build_run_loaders(cfg, mean, std, d):
    """A run's loaders: cfg the run config, d its process (hcd.engine.distributed.Dist). A 16-bit run gets
    its images in its 16-bit dtype: what the 16-bit teacher takes, what a -pure student computes in, and what
    autocast rounds them to in the student's first layer (the trainer casts them to fp32 weights' dtype
    first: a lossless round trip)."""
    from hcd.engine.data.batch_aug import wrap_train_loader
    from hcd.engine.speed import half_dtype
    train, val = build_loaders(cfg.data, mean, std, rank=d.rank, world_size=d.world, seed=cfg.seed, device=d.device,
                               num_classes=cfg.model.num_classes, dtype=half_dtype(cfg.train.precision))
    # data.reprob / mixup / cutmix: batch-level, train only (batch_aug.py); the train loader itself otherwise
    return wrap_train_loader(train, cfg, d.rank, d.device), val
