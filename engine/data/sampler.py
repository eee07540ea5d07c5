"""Which samples each rank sees, in which order: pure functions of (n, seed, epoch, rank, world_size).

The torch loader (and the synthetic one) takes its batches from here. The DALI loader does not: DALI's file
reader shards and shuffles (engine/data/dali.py), with the same number of samples per rank (n // W) for train.
Train: one permutation per (seed, epoch), shared by all ranks; its first n - n % world_size entries are
dealt round-robin, so ranks are disjoint and all get n // world_size samples -> the same number of
batches (the few left-over samples differ each epoch, so none is left out for good).
Val: no shuffling, no padding: rank r takes r, r + W, r + 2W, ... (every sample exactly once overall).
"""
import numpy as np


def _rng(seed: int, epoch: int) -> np.random.Generator:
    # SeedSequence needs non-negative ints; mask keeps negative seeds legal and distinct.
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch])


def train_indices(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    per_rank = n // world_size
    perm = _rng(seed, epoch).permutation(n)
    return perm[: per_rank * world_size][rank::world_size]


def val_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    return np.arange(rank, n, world_size)


def batch(indices: np.ndarray, batch_size: int, drop_last: bool) -> list:
    n = len(indices) // batch_size * batch_size if drop_last else len(indices)
    return [indices[i:i + batch_size] for i in range(0, n, batch_size)]


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)
