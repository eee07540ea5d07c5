"""Both loaders (torch, and DALI's CPU pipeline for real) against the generated solid-colour folder."""
import logging

import pytest
import torch

from hcd.engine.config import ConfigError, DataConfig
from hcd.engine.data import build_loaders
from hcd.engine.errors import DataError

from .jpegs import (BACKENDS, MEAN, SORTED, STD, TRAIN_PER_CLASS, VAL_PER_CLASS, identify, ids_of,
                       loader_order,
                       jpeg_with_garbage_body, truncated_jpeg)

N_TRAIN, N_VAL = 3 * TRAIN_PER_CLASS, 3 * VAL_PER_CLASS


def make(root, backend, rank=0, world_size=1, seed=0, **kw):
    cfg = DataConfig(root=str(root), loader=backend, batch_size=4, num_workers=0, img_size=16, **kw)
    return build_loaders(cfg, MEAN, STD, rank=rank, world_size=world_size, seed=seed,
                         device=torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_shapes_labels_normalisation(dataset, backend):
    train, val = make(dataset, backend, val_batch_size=5)
    assert train.classes == val.classes == SORTED
    assert (len(train), train.num_samples) == (N_TRAIN // 4, N_TRAIN)        # drop: 7 full batches
    assert (len(val), val.num_samples) == (3, N_VAL)                          # 5 + 5 + 2
    for loader, sizes in ((train, [4] * 7), (val, [5, 5, 2])):
        seen = []
        for images, labels in loader:
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            assert images.shape[1:] == (3, 16, 16) and images.is_contiguous()
            classes, ids, spread = identify(images)
            assert classes == labels.tolist()       # label = index of the sorted class-folder name
            assert spread < 6                       # solid images stay solid: normalisation is per channel
            seen.append(len(labels))
        assert seen == sizes
    assert train.skipped == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_partial_last_batch(dataset, backend):
    train, _ = make(dataset, backend, channels_last=True, last_batch="partial")
    sizes = [len(labels) for _, labels in train]
    assert sizes == [4] * 7 + [2] and len(train) == 8
    images, _ = next(iter(train))
    assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_disjoint_complete_and_reshuffled(dataset, backend):
    ranks = [make(dataset, backend, rank=r, world_size=2, seed=3, last_batch="partial")[0] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4 and ranks[0].num_samples == 15
    by_epoch = []
    for epoch in (0, 1):
        seen = []
        for loader in ranks:
            loader.set_epoch(epoch)
            seen.append(ids_of(loader))
        assert not set(seen[0]) & set(seen[1])                        # disjoint
        assert sorted(seen[0] + seen[1]) == list(range(N_TRAIN))      # complete (30 = 2 x 15)
        by_epoch.append(seen[0])
    assert by_epoch[0] != by_epoch[1]                                 # reshuffled
    ranks[0].set_epoch(0)
    assert ids_of(ranks[0]) == by_epoch[0]                            # order = f(seed, epoch, rank)


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_shards_once_each_in_fixed_order(dataset, backend):
    vals = [make(dataset, backend, rank=r, world_size=2, val_batch_size=4)[1] for r in (0, 1)]
    first = [ids_of(v) for v in vals]
    order = loader_order(N_TRAIN, VAL_PER_CLASS)
    # torch: r::world_size of the sorted files; DALI's reader: the contiguous half
    assert first[0] == (order[0::2] if backend == "torch" else order[:N_VAL // 2])
    assert sorted(first[0] + first[1]) == list(range(N_TRAIN, N_TRAIN + N_VAL))
    vals[0].set_epoch(5)
    assert ids_of(vals[0]) == first[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_batch_resumes_mid_epoch(dataset, backend):
    train, _ = make(dataset, backend, seed=1)
    train.set_epoch(2)
    full = ids_of(train)
    train.set_epoch(2, start_batch=5)
    assert ids_of(train) == full[5 * 4:]
    train.set_epoch(2)
    for _ in zip(range(2), train):   # a pass abandoned mid-epoch leaves nothing behind
        pass
    assert ids_of(train) == full
    with pytest.raises(ValueError):
        train.set_epoch(0, start_batch=len(train) + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_file_raises_naming_it(dataset_copy, backend):
    bad = dataset_copy / "train" / "bee" / "zz_bad.jpg"
    jpeg_with_garbage_body(bad)
    train, _ = make(dataset_copy, backend, last_batch="partial")
    with pytest.raises(DataError) as e:
        for _ in train:
            pass
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_files_skipped_counted_warned_once(dataset_copy, backend, caplog):
    bees = dataset_copy / "train" / "bee"
    bad = [bees / "zz_body.jpg", bees / "zz_trunc.jpg", bees / "zz_noise.png"]
    jpeg_with_garbage_body(bad[0])
    truncated_jpeg(bad[1], next(bees.glob("img*.jpg")))
    bad[2].write_bytes(b"not an image at all")
    # seeds whose orders put no bad file alone in the partial last batch (a batch of bad files only is an error)
    train, _ = make(dataset_copy, backend, on_corrupt="skip", last_batch="partial", seed=2 if backend == "torch" else 0)
    with caplog.at_level(logging.WARNING, logger="hcd.data"):
        for epoch in (0, 1):
            train.set_epoch(epoch)
            assert sorted(ids_of(train)) == list(range(N_TRAIN))   # every good image, once
            assert train.skipped == 3 * (epoch + 1)
    warned = [r.getMessage() for r in caplog.records if r.name == "hcd.data"]
    assert len(warned) == 3 and all(any(str(p) in w for w in warned) for p in bad)
    assert set(train.bad) == {str(p) for p in bad}


def test_torch_workers_report_corrupt_files(dataset_copy):
    bad = dataset_copy / "train" / "ant" / "zz_bad.jpg"
    jpeg_with_garbage_body(bad)
    cfg = DataConfig(root=str(dataset_copy), loader="torch", batch_size=8, num_workers=2, img_size=16)
    train, _ = build_loaders(cfg, MEAN, STD)
    with pytest.raises(DataError, match="zz_bad.jpg"):
        for _ in train:
            pass


def test_file_list(dataset, tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("# comment\nant/img010.jpg 0\n\nbee/img020.jpg 1\ncat/img000.jpg 2\ncat/img001.jpg 2\n")
    cfg = DataConfig(root=str(dataset), train_list=str(lst), loader="torch", batch_size=2,
                     num_workers=0, img_size=16)
    train, _ = build_loaders(cfg, MEAN, STD)
    assert train.classes == SORTED and train.num_samples == 4
    assert sorted(ids_of(train)) == [0, 1, 10, 20]
    lst.write_text("ant/img010.jpg 7\n")
    with pytest.raises(DataError, match="label 7"):
        build_loaders(cfg, MEAN, STD)


def test_home_relative_root(dataset, monkeypatch):
    """data.root: ~/... works in every config, as it does in demo.yaml."""
    monkeypatch.setenv("HOME", str(dataset.parent))
    cfg = DataConfig(root=f"~/{dataset.name}", loader="torch", batch_size=2, num_workers=0, img_size=16)
    train, val = build_loaders(cfg, MEAN, STD)
    assert train.classes == SORTED and val.num_samples == len(SORTED) * VAL_PER_CLASS


def test_loader_choice(dataset, monkeypatch, tmp_path):
    train, _ = make(dataset, "auto")
    assert train.backend == "torch"                 # no CUDA here
    from hcd.engine.data import build
    monkeypatch.setattr(build, "dali_available", lambda: False)
    with pytest.raises(ConfigError, match="data.loader"):
        make(dataset, "dali")
    with pytest.raises(DataError, match="dataset folder not found"):
        make(tmp_path / "nowhere", "torch")


def test_torch_workers_survive_a_process_group_sigterm(dataset):
    # torchrun / SLURM signal the whole process group on pre-emption: the workers must leave SIGTERM to the
    # trainer (which checkpoints), not die and crash the pass with "DataLoader worker killed by signal".
    import os
    import signal
    cfg = DataConfig(root=str(dataset), loader="torch", batch_size=2, num_workers=1, img_size=16)
    train, _ = build_loaders(cfg, MEAN, STD)
    it = iter(train._dataloader())
    next(it)
    workers = [w.pid for w in it._workers]
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    n = 1 + sum(1 for _ in it)  # the rest of the pass still arrives
    assert n == len(train)


def test_a_pass_finalises_garbage_before_forking_its_workers(dataset):
    """An unreachable object whose finaliser cannot run in a forked worker (a DALI pipeline left in a reference
    cycle: its shutdown waits for threads the child does not have; it hung a whole pytest run once) is
    finalised in this process before a pass forks its workers, not later in a worker."""
    import gc
    import os
    finalised = []

    class Held:
        def __del__(self):
            finalised.append(os.getpid())

    cfg = DataConfig(root=str(dataset), loader="torch", batch_size=2, num_workers=1, img_size=16)
    train, _ = build_loaders(cfg, MEAN, STD)
    held = Held()
    held.cycle = held
    gc.collect()  # reachable: survives into the oldest generation, which automatic collections rarely visit
    del held
    assert finalised == []
    next(iter(train))
    assert finalised == [os.getpid()]
