"""Data loading: DALI pipelines, torch fallback, the embedded demo dataset, data-check.

`build_loaders` is imported lazily so `hcd data-check` and `engine.data.demo` do not pay for torch.
"""


def build_loaders(data_cfg, mean, std, rank=0, world_size=1, seed=0, device=None):
    """(train_loader, val_loader); see engine.data.build.build_loaders."""
    import torch as _torch  # underscore: `engine.data.torch` (the submodule) must not be shadowed
    from engine.data.build import build_loaders as _build
    return _build(data_cfg, mean, std, rank=rank, world_size=world_size, seed=seed,
                  device=_torch.device("cpu") if device is None else device)
