"""Data loading: DALI pipelines, torch fallback, the embedded demo dataset, data-check.

`build_loaders` is imported lazily so `hcd data-check` and `hcd.engine.data.demo` do not pay for torch.
"""


def build_loaders(data_cfg, mean, std, rank=0, world_size=1, seed=0, device=None):
    """(train_loader, val_loader); see hcd.engine.data.build.build_loaders."""
    import torch as _torch  # underscore: `hcd.engine.data.torch` (the submodule) must not be shadowed
    from hcd.engine.data.build import build_loaders as _build
    return _build(data_cfg, mean, std, rank=rank, world_size=world_size, seed=seed,
                  device=_torch.device("cpu") if device is None else device)
