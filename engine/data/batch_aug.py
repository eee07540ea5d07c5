"""Batch-level train augmentation (DeiT's recipe): timm's RandomErasing, then timm's Mixup/CutMix, on the
normalised batch on its device, for every loader backend (torch, DALI, synthetic).

BatchAugment wraps the train loader (hcd.engine.data.build_run_loaders) and keeps its interface (len, set_epoch,
state_dict, classes, ...); it is not built at all when data.reprob, data.mixup and data.cutmix are all 0, so the
default path is unchanged. Yields (images, targets): with Mixup/CutMix active (data.mixup or data.cutmix > 0)
targets are (B, C) float32 class probabilities on the device, else the loader's int64 labels.

Label smoothing is carried by the mixed target: Mixup builds it with eps = loss.label_smoothing and the losses
must then use eps = 0 (train_loss_config), else it would be applied twice. Either place gives the same target:
mixing is linear, so for one-hot e_a, e_b and smooth(e) = (1 - eps) e + eps / C,
    lam smooth(e_a) + (1 - lam) smooth(e_b) = (1 - eps) (lam e_a + (1 - lam) e_b) + eps / C.

Randomness: timm draws from numpy's and python's global RNGs and the device's torch generator; every batch
draws inside rng.seeded_globals(seed, rank, epoch, batch index in the epoch), so a run resumed mid-epoch
(set_epoch(epoch, start_batch)) augments its batches exactly as the uninterrupted run did, and the trainer's
own RNG streams are left as they were.
"""
import dataclasses

import torch

from hcd.engine.data.rng import seeded_globals

BATCH_KEY = 0xBA7C4  # separates the batch-level streams from the per-sample ones keyed by the same seed


def mixup_active(data_cfg) -> bool:
    return data_cfg.mixup > 0 or data_cfg.cutmix > 0


def batch_augment_active(data_cfg) -> bool:
    return mixup_active(data_cfg) or data_cfg.reprob > 0


def train_loss_config(cfg):
    """cfg for building the train losses: loss.label_smoothing 0 when Mixup/CutMix is active (the mixed target
    already carries it, see the module docstring), cfg itself otherwise."""
    if not mixup_active(cfg.data) or cfg.loss.label_smoothing == 0:
        return cfg
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, label_smoothing=0.0))


def smooth_mix(labels: torch.Tensor, num_classes: int, lam: float, eps: float) -> torch.Tensor:
    """lam smooth(e_y) + (1 - lam) smooth(e_y of the reversed batch): timm's mixup_target, written out (a
    reference for tests and for the odd-sample rule below)."""
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)
    smooth = one_hot * (1 - eps) + eps / num_classes
    return lam * smooth + (1 - lam) * smooth.flip(0)


class BatchAugment:
    """Random erasing (probability reprob, timm's per-pixel normal fill, one region) then Mixup/CutMix
    (timm's Mixup, mode 'batch': one lam and one mix-or-cut choice per batch, sample i mixed with sample
    B - 1 - i). timm's batch mode needs an even batch: config.validate asks for an even data.batch_size with
    data.last_batch 'drop'; a batch left odd by on_corrupt: skip mixes its first B - 1 samples and gives the
    last its own smoothed label."""

    def __init__(self, loader, *, num_classes: int, seed: int, rank: int, reprob: float = 0.0,
                 mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.0, device=None):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing
        self.loader, self.num_classes, self.seed, self.rank = loader, num_classes, seed, rank
        self.device = torch.device(device if device is not None else getattr(loader, "device", "cpu"))
        self.label_smoothing = label_smoothing
        self.erase = (RandomErasing(reprob, mode="pixel", max_count=1, device=self.device) if reprob > 0
                      else None)
        self.mix = (Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=switch_prob,
                          mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)
                    if mixup > 0 or cutmix > 0 else None)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # classes, num_samples, skipped, bad, dtype, epoch, backend, ...
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def state_dict(self):
        return self.loader.state_dict()  # the augmentation itself needs only (epoch, batch): no state

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self):
        epoch = int(getattr(self.loader, "epoch", 0))
        b = int(getattr(self.loader, "start_batch", 0))  # read before the pass: synthetic resets it after
        for images, labels in self.loader:
            with seeded_globals(self.seed, BATCH_KEY, self.rank, epoch, b, device=images.device):
                out = self.apply(images, labels)
            yield out  # outside the block: the training step draws from the trainer's own streams
            b += 1

    def apply(self, images: torch.Tensor, labels: torch.Tensor):
        """One batch, in place on `images`; draws from the global RNGs (the caller seeds them)."""
        if self.erase is not None:
            self.erase(images)  # timm's RandomErasing loops over a 4-D batch, sample by sample
        if self.mix is None:
            return images, labels
        even = len(images) - len(images) % 2
        parts = []
        if even:
            _, mixed = self.mix(images[:even], labels[:even])  # a view: mixes `images` in place
            parts.append(mixed)
        if even < len(images):
            parts.append(smooth_mix(labels[even:], self.num_classes, 1.0, self.label_smoothing).float())
        return images, torch.cat(parts) if len(parts) > 1 else parts[0]


def batch_augment(cfg, loader, rank: int, device) -> BatchAugment:
    """The run config's BatchAugment around `loader` (None: apply() only, as `hcd bench`'s step does)."""
    d = cfg.data
    return BatchAugment(loader, num_classes=cfg.model.num_classes, seed=cfg.seed, rank=rank, reprob=d.reprob,
                        mixup=d.mixup, cutmix=d.cutmix, mixup_prob=d.mixup_prob, switch_prob=d.mixup_switch_prob,
                        label_smoothing=cfg.loss.label_smoothing, device=device)


def wrap_train_loader(loader, cfg, rank: int, device):
    """`loader` wrapped in BatchAugment per cfg.data, or `loader` itself when no batch augmentation is set."""
    return batch_augment(cfg, loader, rank, device) if batch_augment_active(cfg.data) else loader
