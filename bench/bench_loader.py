"""Loader throughput: DALI's CPU pipeline vs the torch DataLoader on the same generated JPEG folder,
same worker/thread count, images/s of one full pass (train: random-resized-crop + flip; val: resize +
centre crop; both 224 px, normalised float32 NCHW).

Run explicitly (bench/ is not collected by the test command):
    python -m pytest bench/bench_loader.py --benchmark-only
"""
import os

import pytest
import torch

from hcd.engine.bench.loader_rows import build_pass, dali_available, make_photo_folder

N_PER_CLASS, CLASSES = 64, 4          # 256 images per split
WORKERS = int(os.environ.get("HCD_BENCH_WORKERS", "2"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("bench_jpegs"), N_PER_CLASS, CLASSES)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="nvidia.dali is not importable"))])
def test_loader_throughput(benchmark, folder, backend, split):
    torch.set_num_threads(1)  # the main process only normalises; workers/threads do the decoding
    one_pass = build_pass(folder, backend, split, WORKERS)

    n = benchmark.pedantic(one_pass, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable: one pass ran, nothing was timed
        benchmark.extra_info.update(images=n, workers=WORKERS,
                                    images_per_s=round(n / benchmark.stats.stats.mean, 1))
