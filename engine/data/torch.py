"""The fallback loader for machines without DALI: PIL decode + torchvision transforms in DataLoader
workers, batches chosen by hcd.engine.data.sampler (not the DALI loader's order: DALI's reader shuffles).

Workers return uint8 images plus the corrupt files they met (a file that fails to read or decode never
raises in a worker: that would reach the trainer as a multi-line wrapped traceback, not a DataError naming the
file); the main process applies the on_corrupt policy, then moves the batch to the device and normalises it
there. An error in a transform is a bug, not a bad file: it is raised.
"""
import gc

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.transforms import functional as F

from hcd.engine.data.auto_augment import timm_train_transform
from hcd.engine.data.base import ImageSpec, ShardedLoader
from hcd.engine.data.corrupt import short_reason
from hcd.engine.data.rng import seeded_globals
from hcd.engine.data.transforms import train_transform, val_transform

SAMPLE_KEY = 0xA4  # separates the per-sample timm streams from other streams keyed by the same seed


class _Images(Dataset):
    """Keys are (index, epoch): the epoch seeds the sample's augmentation (see transforms.py; with
    data.auto_augment, timm's transform run on global RNGs seeded from the same key: auto_augment.py)."""

    def __init__(self, paths: list, spec: ImageSpec, train: bool, seed: int):
        self.paths, self.spec, self.train = paths, spec, train
        self.seed = seed & 0xFFFFFFFFFFFFFFFF
        self.timm_transform = timm_train_transform(spec) if train and spec.auto_augment else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        i, epoch = key
        try:
            with Image.open(self.paths[i]) as im:
                img = im.convert("RGB")  # full decode: truncated files fail here
        except Exception as e:  # any decode/read failure is a bad file; the main process decides
            return None, i, short_reason(e)
        # Transforms run outside the try: an error there is a bug or an incompatibility, not a bad file, and
        # must not be reported as one (with on_corrupt: skip it would silently drop the image)
        if self.timm_transform is not None:
            # a worker's globals are its own; the main process's (num_workers 0) are put back
            with seeded_globals(self.seed, epoch, i, SAMPLE_KEY, restore=get_worker_info() is None):
                x = F.pil_to_tensor(self.timm_transform(img))
        elif self.train:
            x = train_transform(img, self.spec.img_size, np.random.default_rng([self.seed, epoch, i]),
                                self.spec.train_interpolation)
        else:
            x = val_transform(img, self.spec.img_size, self.spec.val_resize)
        return x, i, None


def _collate(items):
    good = [(x, i) for x, i, reason in items if reason is None]
    images = torch.stack([x for x, _ in good]) if good else None
    idx = np.array([i for _, i in good], dtype=np.int64)
    return images, idx, [(i, reason) for _, i, reason in items if reason is not None]


class _PlanBatches:
    """A batch sampler reading the loader's current plan, so one DataLoader serves every epoch: the
    sampler runs in the main process, workers only see keys."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = loader

    def __iter__(self):
        epoch = self.loader.epoch
        for b in self.loader.plan():
            yield [(int(i), epoch) for i in b]

    def __len__(self):
        return len(self.loader) - self.loader.start_batch


def _ignore_stop_signals(_worker_id):
    """Workers leave SIGTERM/SIGINT to the main process: torchrun and SLURM signal the whole process group,
    and a worker killed by it would crash the trainer before it writes its pre-emption checkpoint."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TorchLoader(ShardedLoader):
    backend = "torch"

    def __init__(self, split, spec, **kw):
        super().__init__(split, spec, **kw)
        self._dl = None

    def _dataloader(self) -> DataLoader:
        # Each pass forks its workers. Collect garbage first: an unreachable object whose __del__ cannot run
        # in a forked child (a DALI pipeline left in a reference cycle by an earlier loader in this process:
        # its shutdown waits for threads the child does not have) would otherwise be collected there and hang
        # the worker, and the pass with it. Measured: a pytest run that built DALI loaders first hung here.
        gc.collect()
        if self._dl is None:
            self._dl = DataLoader(
                _Images(self.split.paths, self.spec, self.train, self.seed),
                batch_sampler=_PlanBatches(self), num_workers=self.num_workers, collate_fn=_collate,
                pin_memory=self.device.type == "cuda",
                # Not persistent: workers of a pass abandoned on a DataError would linger (and make
                # interpreter exit wait ~5 s per worker); a fresh fork per epoch costs well under a second.
                persistent_workers=False, worker_init_fn=_ignore_stop_signals)
        return self._dl

    def __iter__(self):
        for images, idx, bad in self._dataloader():
            for i, reason in bad:
                self.policy.report(self.split.paths[i], reason)  # raises with on_corrupt: error
            if images is None:
                raise self.policy.all_bad(self.split.paths[bad[0][0]])
            yield self.normalize_uint8(images), self.labels(idx)
