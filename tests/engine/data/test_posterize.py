"""timm's posterize under Pillow 13 (engine/data/auto_augment.py, posterize) and the torch loader's rule that a
transform error is raised, never reported as a corrupt file (engine/data/torch.py)."""
import numpy as np
import pytest
from PIL import Image

from hcd.engine.data.auto_augment import timm_train_transform
from hcd.engine.data.base import ImageSpec

from .jpegs import MEAN, STD


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / "train" / c / f"{k}.jpg")
    return root


def test_posterize_at_magnitude_10_is_black_not_an_error():
    """timm's PosterizeIncreasing keeps 0 bits at level 10 (m9 + its magnitude noise reaches it); Pillow >= 12
    refuses 0 bits, which made the torch loader report good images as corrupt. Every op of the built transform
    uses the posterize that keeps timm's meaning (0 bits: black) and Pillow's for 1-7 bits."""
    from PIL import ImageOps

    from hcd.engine.data.auto_augment import posterize
    spec = ImageSpec(24, 1.0, MEAN, STD, auto_augment="rand-m9-mstd0.5-inc1")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(posterize(img, 0)), np.zeros((20, 30, 3), np.uint8))
    for bits in (1, 4, 7):
        assert np.array_equal(np.asarray(posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
    assert posterize(img, 8) is img
    ops = [op for t in timm_train_transform(spec).transforms for op in getattr(t, "ops", [])]
    op = next(op for op in ops if op.name == "PosterizeIncreasing")
    assert op.aug_fn is posterize
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0  # the level that asks for 0 bits
    assert not np.asarray(op(img)).any()


def test_a_transform_error_is_raised_not_reported_as_a_corrupt_file(photos):
    from hcd.engine.data.folder import load_split
    from hcd.engine.data.torch import _Images
    spec = ImageSpec(24, 1.0, MEAN, STD, auto_augment="rand-m9-mstd0.5-inc1")
    images = _Images(load_split(str(photos), "train").paths, spec, train=True, seed=0)
    assert images[(0, 0)][2] is None  # a good file: an image, no reason

    def broken(img):
        raise RuntimeError("an augmentation bug")
    images.timm_transform = broken
    with pytest.raises(RuntimeError, match="an augmentation bug"):
        images[(0, 0)]


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m1", "v0", "original", "augmix-m5-w4-d2"])
def test_every_posterize_op_of_every_policy_uses_ours(policy):
    """RandAugment's and AugMix's ops, AutoAugment's sub-policies ('v0' has Posterize at level 2: 0 bits)."""
    from timm.data import auto_augment

    from hcd.engine.data.auto_augment import posterize
    transform = timm_train_transform(ImageSpec(24, 1.0, MEAN, STD, auto_augment=policy))
    ops = [op for t in transform.transforms for op in [*getattr(t, "ops", []),
                                                       *(o for sub in getattr(t, "policy", []) for o in sub)]]
    named = [op for op in ops if op.name.startswith("Posterize")]
    assert named and all(op.aug_fn is posterize for op in named)
    assert not any(op.aug_fn is auto_augment.posterize for op in ops)
