"""What the DALI and torch loaders share: the epoch plan, the public attributes, the corrupt policy.

Interface (both loaders):
  len(loader)                  batches per epoch for this rank (the whole epoch, whatever start_batch is)
  loader.set_epoch(e, start_batch=0)   order of epoch e; the next passes start at batch `start_batch`
                               (a resumed run skips the batches it already trained on, without decoding)
  for images, labels in loader: NCHW (channels-last strides if configured) normalised, int64, on the
                               loader's device; images in loader.dtype (float32, or the run's 16-bit dtype)
                               (a run's train loader with data.mixup/cutmix, wrapped by batch_aug.BatchAugment,
                               gives (B, C) float32 probabilities instead of the int64 labels)
  loader.state_dict() / load_state_dict(state)   where the loader stands, for a checkpoint (None: nothing
                               beyond set_epoch's (epoch, start_batch) is needed, as for the torch loader)
  loader.classes, loader.num_samples (samples this rank sees per epoch), loader.skipped (samples dropped
  as corrupt so far, all epochs), loader.bad (path -> reason of every corrupt file seen)
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hcd.engine.data import sampler
from hcd.engine.data.corrupt import CorruptPolicy
from hcd.engine.data.folder import Split
from hcd.engine.errors import DataError


@dataclass(frozen=True)
class ImageSpec:
    img_size: int
    crop_pct: float
    mean: tuple   # 0-1 scale, as timm's pretrained_cfg gives them
    std: tuple
    channels_last: bool = False
    train_interpolation: str = "random"   # random | bilinear | bicubic (data.train_interpolation)
    auto_augment: Optional[str] = None    # timm's policy string (data.auto_augment; auto_augment.py)

    @property
    def val_resize(self) -> int:
        # timm's eval transform: shorter side to floor(img_size / crop_pct), then a centre crop.
        return math.floor(self.img_size / self.crop_pct)


class ShardedLoader:
    def __init__(self, split: Split, spec: ImageSpec, *, train: bool, batch_size: int, num_workers: int,
                 rank: int, world_size: int, seed: int, drop_last: bool, on_corrupt: str,
                 device: torch.device, dtype: torch.dtype = torch.float32):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.split, self.spec, self.train = split, spec, train
        self.batch_size, self.num_workers = batch_size, num_workers
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.drop_last = drop_last and train  # val always keeps its partial last batch
        self.device, self.dtype = torch.device(device), dtype
        self.classes = list(split.classes)
        n = len(split)
        self.num_samples = n // world_size if train else len(range(rank, n, world_size))
        self._len = sampler.num_batches(self.num_samples, batch_size, self.drop_last)
        if train and self._len == 0:
            raise DataError(f"{split.source}: {n} images give {self.num_samples} per rank on {world_size} "
                            f"rank(s), less than one batch of {batch_size} (data.last_batch: drop)")
        self.policy = CorruptPolicy(on_corrupt)
        self.epoch, self.start_batch = 0, 0
        self._mean255 = torch.tensor([m * 255 for m in spec.mean]).view(1, 3, 1, 1)
        self._std255 = torch.tensor([s * 255 for s in spec.std]).view(1, 3, 1, 1)

    def __len__(self):
        return self._len

    @property
    def skipped(self) -> int:
        return self.policy.skipped

    @property
    def bad(self) -> dict:
        return dict(self.policy.bad)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self._len:
            raise ValueError(f"start_batch {start_batch} outside 0..{self._len}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass

    def plan(self) -> list:
        """Index arrays (into split.paths) of this pass's batches, known-corrupt files already removed."""
        if self.train:
            idx = sampler.train_indices(len(self.split), self.seed, self.epoch, self.rank, self.world_size)
        else:
            idx = sampler.val_indices(len(self.split), self.rank, self.world_size)
        batches = sampler.batch(idx, self.batch_size, self.drop_last)[self.start_batch:]
        if self.policy.bad:
            batches = [self._drop_known_bad(b) for b in batches]
        return batches

    def _drop_known_bad(self, b: np.ndarray) -> np.ndarray:
        keep = np.array([self.split.paths[i] not in self.policy.bad for i in b], dtype=bool)
        if not keep.any():
            raise self.policy.all_bad(self.split.paths[b[0]])
        self.policy.skipped += int((~keep).sum())
        return b[keep]

    def labels(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.split.labels[idx]).to(self.device, non_blocking=True)

    def normalize_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW on the host -> normalised float32 on the device (moving uint8 is 4x cheaper), then the
        loader's dtype."""
        x = images.to(self.device, non_blocking=True)
        if self.spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.float()  # keeps the memory format
        return x.sub_(self._mean255.to(x.device)).div_(self._std255.to(x.device)).to(self.dtype)
