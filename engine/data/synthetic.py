"""Synthetic loaders with the interface of hcd.engine.data.build_loaders (data.loader: synthetic).

Every image is a fixed per-class pattern plus noise, drawn from a generator seeded by (seed, epoch, rank,
batch index) for training and (seed, sample index) for validation: a run resumed at any batch sees exactly
the tensors the uninterrupted run saw, and a student can learn the classes (so accuracy means something).
For tests and benchmarks; no files are read.
"""
import torch

from hcd.engine.data import sampler


def _generator(*key: int) -> torch.Generator:
    g = torch.Generator()
    h = 0
    for k in key:  # a small deterministic mix of the key into one 63-bit seed
        h = (h * 1_000_003 + int(k) + 1) % (2 ** 63 - 1)
    g.manual_seed(h)
    return g


class SyntheticLoader:
    def __init__(self, *, train: bool, num_samples: int, batch_size: int, num_classes: int, img_size: int,
                 mean, std, rank: int, world_size: int, seed: int, drop_last: bool, device):
        self.train, self.batch_size, self.num_classes = train, batch_size, num_classes
        self.img_size, self.rank, self.world_size, self.seed = img_size, rank, world_size, seed
        self.device = torch.device(device)
        self.classes = [str(c) for c in range(num_classes)]
        # The shards of the file loaders (hcd.engine.data.sampler): train n // W samples per rank; val
        # every sample once across ranks (rank r: r, r + W, ...), each drawn from its own global index.
        self._val_index = None if train else sampler.val_indices(num_samples, rank, world_size)
        self.num_samples = num_samples // world_size if train else len(self._val_index)
        self.drop_last = drop_last and train
        self._len = sampler.num_batches(self.num_samples, batch_size, self.drop_last)
        self.skipped = 0
        self.epoch, self.start_batch = 0, 0
        # Class patterns in [0, 1] pixel space, normalised like real images.
        g = _generator(seed, 10 ** 6)
        protos = torch.rand(num_classes, 3, img_size, img_size, generator=g)
        self._protos = (protos - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def state_dict(self):
        return None  # (epoch, start_batch) is all it needs

    def load_state_dict(self, state) -> None:
        pass

    def _batch(self, b: int):
        size = min(self.batch_size, self.num_samples - b * self.batch_size)
        if self.train:
            g = _generator(self.seed, self.epoch, self.rank, b)
            labels = torch.randint(0, self.num_classes, (size,), generator=g)
            noise = torch.randn(size, 3, self.img_size, self.img_size, generator=g)
        else:  # one generator per global sample index: independent of world size and batch size
            idx = self._val_index[b * self.batch_size:b * self.batch_size + size].tolist()
            labels, noise = [], []
            for i in idx:
                g = _generator(self.seed, -1, i)
                labels.append(torch.randint(0, self.num_classes, (1,), generator=g))
                noise.append(torch.randn(1, 3, self.img_size, self.img_size, generator=g))
            labels, noise = torch.cat(labels), torch.cat(noise)
        images = self._protos[labels] + noise
        return images.to(self.device), labels.to(self.device)

    def __iter__(self):
        for b in range(self.start_batch, self._len):
            yield self._batch(b)
        self.start_batch = 0  # the next pass of the same epoch starts at its beginning


def build_synthetic_loaders(data_cfg, mean, std, rank=0, world_size=1, seed=0, device=None, num_classes=None):
    """(train_loader, val_loader) of synthetic class-pattern images; see the module docstring."""
    if num_classes is None:
        raise ValueError("num_classes: data.loader 'synthetic' needs the number of classes to draw")
    device = torch.device("cpu") if device is None else device
    common = dict(num_classes=num_classes, img_size=data_cfg.img_size, mean=mean, std=std, rank=rank,
                  world_size=world_size, seed=seed, device=device)
    train = SyntheticLoader(train=True, num_samples=data_cfg.synthetic_train_size, batch_size=data_cfg.batch_size,
                            drop_last=data_cfg.last_batch == "drop", **common)
    val = SyntheticLoader(train=False, num_samples=data_cfg.synthetic_val_size,
                          batch_size=data_cfg.val_batch_size or data_cfg.batch_size, drop_last=False, **common)
    return train, val
