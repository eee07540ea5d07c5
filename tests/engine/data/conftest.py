"""Fixtures: the generated solid-colour JPEG folder (see jpegs.py)."""
import shutil

import pytest

from .jpegs import TRAIN_PER_CLASS, VAL_PER_CLASS, write_split


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    n = write_split(root / "train", TRAIN_PER_CLASS, 0)
    write_split(root / "val", VAL_PER_CLASS, n)
    return root


@pytest.fixture
def dataset_copy(dataset, tmp_path):
    """A private copy to plant bad files in."""
    dst = tmp_path / "data"
    shutil.copytree(dataset, dst)
    return dst
