"""The DALI loader's own properties (fn.readers.file, DALI checkpointing), and the 16-bit output of both loaders."""
import json

import pytest
import torch

from hcd.engine.config import DataConfig
from hcd.engine.data import build_loaders
from hcd.engine.errors import DataError

from .jpegs import BACKENDS, MEAN, SORTED, STD, TRAIN_PER_CLASS, dali_importable, ids_of, jpeg_with_garbage_body

needs_dali = pytest.mark.skipif(not dali_importable(), reason="nvidia.dali is not importable")
N_TRAIN = 3 * TRAIN_PER_CLASS


def make(root, backend="dali", rank=0, world_size=1, seed=0, dtype=None, **kw):
    cfg = DataConfig(root=str(root), loader=backend, batch_size=4, num_workers=0, img_size=16, **kw)
    return build_loaders(cfg, MEAN, STD, rank=rank, world_size=world_size, seed=seed, device=torch.device("cpu"),
                         dtype=dtype)


@needs_dali
def test_reader_shards_uneven_list_same_length_every_sample_once(dataset_copy):
    # 31 files on 2 ranks: DALI's slices are 15 and 16 files; both ranks take 15 (the torch loader's n // W),
    # so both have the same batches per epoch; the ranks are disjoint and the one left out changes per epoch.
    from PIL import Image
    Image.new("RGB", (30, 26), (40 + 80 * SORTED.index("ant"), 5 + 6 * 40, 128)).save(
        dataset_copy / "train" / "ant" / "zz_extra.jpg", quality=95)  # sample id 40
    ids = set(range(N_TRAIN)) | {40}
    ranks = [make(dataset_copy, rank=r, world_size=2, seed=5, last_batch="partial")[0] for r in (0, 1)]
    assert [(len(x), x.num_samples) for x in ranks] == [(4, 15), (4, 15)]
    left_out = []
    for epoch in range(3):
        seen = []
        for loader in ranks:
            loader.set_epoch(epoch)
            seen.append(ids_of(loader))
        assert [len(s) for s in seen] == [15, 15] and not set(seen[0]) & set(seen[1])
        assert len(set(seen[0] + seen[1])) == 30 and set(seen[0] + seen[1]) <= ids
        left_out.append(ids - set(seen[0] + seen[1]))
    assert len({tuple(x) for x in left_out}) > 1


def _batches(loader, epoch, start=0, n=None):
    loader.set_epoch(epoch, start_batch=start)
    out = []
    for images, labels in loader:
        out.append((images.clone(), labels.clone()))
        if n is not None and len(out) == n:
            break
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@needs_dali
@pytest.mark.parametrize("stop", [(1, 3), (0, 7)])  # mid-epoch; an epoch's end (its padded tail not yet run)
def test_state_dict_resumes_bit_for_bit(dataset, stop):
    def fresh():
        return make(dataset, seed=4)[0]
    full = fresh()
    want = {e: _batches(full, e) for e in range(3)}  # 7 batches per epoch (drop), the reader's 8th discarded
    first = fresh()
    for e in range(stop[0]):
        _batches(first, e)
    _batches(first, stop[0], n=stop[1])
    state = first.state_dict()
    assert state["position"] == list(stop) and isinstance(state["dali"], bytes)
    epoch, batch = (stop[0], stop[1]) if stop[1] < len(first) else (stop[0] + 1, 0)
    resumed = fresh()
    resumed.load_state_dict(state)
    assert _same(_batches(resumed, epoch, start=batch), want[epoch][batch:])
    assert _same(_batches(resumed, epoch + 1), want[epoch + 1])   # and the next epoch
    # the state is DALI's: without it the same position gives other crops (the order is not replayed)
    other = fresh()
    assert not _same(_batches(other, epoch, start=batch), want[epoch][batch:])
    # another world size's state is not applied
    two = make(dataset, rank=0, world_size=2, seed=4)[0]
    two.load_state_dict(state)
    assert two._loaded is None


@needs_dali
def test_corrupt_file_in_a_later_batch_error_and_skip(dataset_copy):
    bad = dataset_copy / "train" / "cat" / "zz_bad.jpg"
    jpeg_with_garbage_body(bad)
    train, _ = make(dataset_copy, seed=1, last_batch="partial")
    given = []
    with pytest.raises(DataError) as e:
        for batch in train:
            given.append(batch)
    assert str(bad) in str(e.value) and "\n" not in str(e.value) and given   # found in a batch after the first
    skip, _ = make(dataset_copy, seed=1, last_batch="partial", on_corrupt="skip")
    clean, _ = make(dataset_copy, seed=1, last_batch="partial", on_corrupt="skip")
    got = _batches(skip, 0)
    assert skip.skipped == 1 and list(skip.bad) == [str(bad)]
    assert sum(len(b[1]) for b in got) == N_TRAIN and len(got) == len(skip)
    # every other sample as the loader gives it with the culprit known from the start (same crops and flips)
    clean._files[clean.split.paths.index(str(bad))] = skip._placeholder
    clean._bad_idx = skip._bad_idx
    assert _same(_batches(clean, 0), got)
    assert ids_of(skip) and skip.skipped == 2     # the next pass of the same epoch drops it again


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_batches(dataset, backend, dtype):
    ref = next(iter(make(dataset, backend, seed=3)[1]))[0]
    assert ref.dtype == torch.float32                                  # fp32 runs: unchanged
    train, val = make(dataset, backend, seed=3, dtype=dtype)
    images, labels = next(iter(val))
    assert images.dtype == dtype and labels.dtype == torch.int64
    assert torch.allclose(images.float(), ref, atol=0.02)             # the same pixels, rounded
    assert next(iter(train))[0].dtype == dtype


def test_run_loaders_follow_the_precision(dataset):
    from types import SimpleNamespace

    from hcd.engine.config import Config
    from hcd.engine.data import build_run_loaders
    d = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16),
                             ("bf16-pure", torch.bfloat16), ("fp16-pure", torch.float16)):
        cfg = Config()
        cfg.data.root, cfg.data.loader, cfg.data.img_size, cfg.data.num_workers = str(dataset), "torch", 16, 0
        cfg.data.batch_size = 4
        cfg.train.precision, cfg.model.num_classes = precision, 3
        train, _ = build_run_loaders(cfg, MEAN, STD, d)
        assert train.dtype == dtype


@needs_dali
def test_trainer_resume_mid_epoch_with_dali_reproduces_the_run(dataset, tmp_path, write_config):
    """The tiny trainer config on the 30 generated JPEGs (3 classes), batch 8: 3 steps per epoch (the reader's 4th
    batch, 6 images + padding, is discarded). Stopped at step 4 (epoch 1, batch 1) and resumed: the same train
    rows as the uninterrupted run, losses bit for bit."""
    from hcd.engine.cli import main
    args = ["train", "--config", write_config(tmp_path), "--set", "data.loader=dali", "--set", f"data.root={dataset}",
            "--set", "data.num_workers=1", "--set", "model.num_classes=3", "--set", "train.export=false"]

    def rows(run):
        out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in out if r["kind"] == "train"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    split = tmp_path / "split"
    assert main([*args, "--out", str(split), "--set", "train.stop_at_step=4"]) == 0
    assert main([*args, "--out", str(split), "--resume"]) == 0
    full = rows(tmp_path / "full")
    assert [r["step"] for r in full] == list(range(1, 7))
    assert rows(split) == full
