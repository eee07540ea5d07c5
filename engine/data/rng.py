"""Seeded global RNGs for third-party augmentations that draw from them (timm's RandAugment, Mixup, RandomErasing).

timm draws from python's `random`, numpy's global RNG and torch's default generators. Run inside
`seeded_globals(*key)`, those draws are a pure function of `key` (a sample's (seed, epoch, index), a batch's
(seed, rank, epoch, batch)): the augmentation then depends neither on the worker count nor on what ran before,
and a run resumed mid-epoch redraws exactly what the uninterrupted run drew. The previous global states are
restored on exit, so the trainer's own randomness (checkpointed per rank) is untouched.
"""
import random
from contextlib import contextmanager

import numpy as np
import torch


def key_seeds(*key: int):
    """(python seed, numpy seed words, torch seed) from a key of non-negative ints, via numpy's SeedSequence
    (well mixed: keys differing in one field give unrelated streams)."""
    words = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in key]).generate_state(6, dtype=np.uint32)
    py = (int(words[0]) << 32) | int(words[1])
    torch_seed = ((int(words[4]) << 32) | int(words[5])) & 0x7FFFFFFFFFFFFFFF
    return py, words[2:4], torch_seed


def _seed(py_seed, np_seed, torch_seed, cuda_index):
    random.seed(py_seed)
    np.random.seed(np_seed)
    torch.random.default_generator.manual_seed(torch_seed)
    if cuda_index is not None:
        torch.cuda.default_generators[cuda_index].manual_seed(torch_seed)


@contextmanager
def seeded_globals(*key: int, device=None, restore: bool = True):
    """python, numpy and torch (CPU, and `device` when it is a CUDA device) global RNGs seeded from `key`
    inside the block, their previous states restored after it. restore=False (a DataLoader worker, whose globals
    nothing else reads) skips the restore: ~0.1 ms of the ~0.2 ms this costs per call, mostly numpy's state."""
    device = None if device is None else torch.device(device)
    cuda = device is not None and device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    seeds = (*key_seeds(*key), index)
    if not restore:
        _seed(*seeds)
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    # fork_rng restores the CPU generator and the listed CUDA devices' only; we seed exactly those (not
    # torch.manual_seed, which would reseed every visible GPU, other ranks' devices included)
    with torch.random.fork_rng(devices=[index] if cuda else []):
        try:
            _seed(*seeds)
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
