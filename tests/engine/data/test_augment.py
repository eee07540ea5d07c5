"""data.auto_augment (timm's RandAugment in the torch loader, DALI's in the DALI pipeline) and the batch-level
RandomErasing + Mixup/CutMix wrapper (engine/data/batch_aug.py): the documented ops, exact resume, the targets
against a float64 reference, the config checks."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hcd.engine.config import Config, ConfigError, DataConfig, validate
from hcd.engine.data import build_loaders, build_run_loaders
from hcd.engine.data.auto_augment import TIMM_TO_DALI, parse_rand_augment, timm_train_transform
from hcd.engine.data.base import ImageSpec
from hcd.engine.data.batch_aug import BatchAugment, smooth_mix, train_loss_config
from hcd.engine.data.rng import seeded_globals

from .jpegs import MEAN, STD, dali_importable

needs_dali = pytest.mark.skipif(not dali_importable(), reason="nvidia.dali is not importable")
RECIPE = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Textured JPEGs (random pixels): colour and geometry ops visibly change them, unlike solid images."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 256, (36 + 4 * k, 44, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{k}.jpg", quality=90)
    return root


def _globals():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()


def _same_globals(a, b):
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


# ------------------------------------------------------------------------------------ auto_augment strings

def test_parse_rand_augment_and_refusals():
    p = parse_rand_augment(RECIPE)
    assert (p.m, p.n, p.mstd, p.inc) == (9, 2, 0.5, True)
    p = parse_rand_augment("rand-n3-m5")
    assert (p.m, p.n, p.mstd, p.inc) == (5, 3, 0.0, False)
    assert parse_rand_augment("rand").m == 10  # timm's defaults: m10, n2
    for bad in ("original", "v0", "augmix-m5", "rand-p0.3", "rand-m11", "rand-tweights", "rand-m9-m8", "rand-inc2"):
        with pytest.raises(ConfigError, match="^data.auto_augment: "):
            parse_rand_augment(bad)


def test_timm_transform_has_the_documented_rand_augment():
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, RandAugment
    t = timm_train_transform(ImageSpec(32, 0.875, MEAN, STD, auto_augment=RECIPE))
    names = [type(s).__name__ for s in t.transforms]
    assert names == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    ra = t.transforms[2]
    assert isinstance(ra, RandAugment) and ra.num_layers == 2
    assert [op.name for op in ra.ops] == _RAND_INCREASING_TRANSFORMS
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in ra.ops} == {(9, 0.5, 0.5)}
    with pytest.raises(ConfigError, match="^data.auto_augment: "):
        timm_train_transform(ImageSpec(32, 0.875, MEAN, STD, auto_augment="bogus-m3"))


def test_timm_rand_augment_changes_images_seeded_per_key(photos):
    spec = ImageSpec(32, 0.875, MEAN, STD, auto_augment=RECIPE)
    t = timm_train_transform(spec)
    crop_flip = t.transforms[:2]
    img = Image.open(next((photos / "train" / "a").iterdir())).convert("RGB")
    before = _globals()
    changed = 0
    for k in range(8):
        with seeded_globals(1, 0, k):
            full = np.asarray(t(img))
        with seeded_globals(1, 0, k):  # the same key: the same crop and flip, without RandAugment
            plain = img
            for s in crop_flip:
                plain = s(plain)
            plain = np.asarray(plain)
        with seeded_globals(1, 0, k):
            again = np.asarray(t(img))
        assert full.shape == plain.shape == (32, 32, 3) and full.dtype == np.uint8
        assert np.array_equal(full, again)
        changed += not np.array_equal(full, plain)
    assert changed >= 3  # 2 ops at p = 0.5 each: an image is untouched with probability ~1/4
    assert _same_globals(before, _globals())


def test_torch_loader_auto_augment_deterministic_and_restores_globals(photos):
    def loader(aa, workers=0):
        cfg = DataConfig(root=str(photos), loader="torch", batch_size=4, num_workers=workers, img_size=24,
                         auto_augment=aa)
        return build_loaders(cfg, MEAN, STD, seed=2)[0]

    def epoch(ld, e=1, start=0):
        ld.set_epoch(e, start)
        return [(x.clone(), y.clone()) for x, y in ld]

    torch.manual_seed(0)
    plain = epoch(loader(None))
    after_plain = _globals()  # torch's DataLoader draws its base seed from torch's RNG, whatever the transform
    torch.manual_seed(0)
    aug = epoch(loader(RECIPE))
    assert _same_globals(after_plain, _globals())  # num_workers 0: timm's draws put the RNGs back
    assert [x.shape for x, _ in aug] == [x.shape for x, _ in plain] and aug[0][0].dtype == torch.float32
    assert all(torch.equal(a[1], p[1]) for a, p in zip(aug, plain))  # same order, same labels
    assert not torch.equal(aug[0][0], plain[0][0])
    random.seed(123), np.random.seed(7), torch.manual_seed(9)  # other globals; a worker; a resumed epoch
    assert all(torch.equal(a[0], b[0]) for a, b in zip(aug, epoch(loader(RECIPE, workers=1))))
    assert torch.equal(aug[1][0], epoch(loader(RECIPE), start=1)[0][0])


# ------------------------------------------------------------------------------------------------- DALI

@needs_dali
def test_dali_ops_mirror_timms_list():
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS
    for text, timm_ops in ((RECIPE, _RAND_INCREASING_TRANSFORMS), ("rand-m9-n2", _RAND_TRANSFORMS)):
        from hcd.engine.data.auto_augment import dali_ops
        ops = dali_ops(parse_rand_augment(text))
        names = [op.name for op in ops]
        assert sorted(n for n in names if n != "identity") == sorted(TIMM_TO_DALI[n] for n in timm_ops)
        assert names.count("identity") == len(timm_ops) == 15  # timm's p = 0.5 per op


@needs_dali
def test_dali_rand_augment_changes_images_and_resumes(photos):
    def loader(aa, seed=3):
        cfg = DataConfig(root=str(photos), loader="dali", batch_size=2, num_workers=1, img_size=24, auto_augment=aa)
        return build_loaders(cfg, MEAN, STD, seed=seed)[0]

    def batches(ld, e=0, start=0, n=None):
        ld.set_epoch(e, start)
        out = []
        for x, y in ld:
            out.append((x.clone(), y.clone()))
            if len(out) == n:
                break
        return out

    plain, full = batches(loader(None)), batches(loader(RECIPE))
    assert [x.shape for x, _ in full] == [x.shape for x, _ in plain]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, plain))
    first = loader(RECIPE)
    batches(first, n=2)
    resumed = loader(RECIPE)
    resumed.load_state_dict(first.state_dict())  # DALI's checkpoint covers the RandAugment draws too
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(batches(resumed, start=2), full[2:]))
    with pytest.raises(ConfigError, match="^data.auto_augment: "):
        build_loaders(DataConfig(root=str(photos), loader="dali", auto_augment="original"), MEAN, STD)


# ---------------------------------------------------------------------------------------- batch level

class _Fake:
    """A loader of float64 random images and labels, with the interface BatchAugment forwards."""
    classes = ["a", "b", "c", "d", "e"]

    def __init__(self, sizes=(6, 6, 6)):
        self.sizes, self.epoch, self.start_batch = sizes, 0, 0

    def __len__(self):
        return len(self.sizes)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        for b in range(self.start_batch, len(self)):
            g = torch.Generator().manual_seed(100 * self.epoch + b)
            yield (torch.randn(self.sizes[b], 3, 8, 10, generator=g, dtype=torch.float64),
                   torch.randint(0, 5, (self.sizes[b],), generator=g))


def _inputs(fake, e=0):
    fake.set_epoch(e)
    return [(x.clone(), y.clone()) for x, y in fake]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mixup_images_and_targets_match_float64_reference(eps):
    aug = BatchAugment(_Fake(), num_classes=5, seed=1, rank=0, mixup=0.8, label_smoothing=eps)
    aug.set_epoch(0)
    for (x, y), (xm, t) in zip(_inputs(_Fake()), aug):
        flip = x.flip(0)
        lam = float(((xm - flip) * (x - flip)).sum() / ((x - flip) ** 2).sum())  # least squares, float64
        assert 0 < lam <= 1
        torch.testing.assert_close(xm, lam * x + (1 - lam) * flip, rtol=0, atol=1e-12)
        assert t.dtype == torch.float32 and t.shape == (6, 5)
        want = smooth_mix(y, 5, lam, eps)
        torch.testing.assert_close(t.double(), want, rtol=0, atol=1e-6)
        # the documented equivalence: smoothing the mixed one-hot gives the same target
        e = torch.nn.functional.one_hot(y, 5).double()
        torch.testing.assert_close((1 - eps) * (lam * e + (1 - lam) * e.flip(0)) + eps / 5, want)


def test_cutmix_pastes_one_box_with_its_area_as_lam():
    aug = BatchAugment(_Fake(), num_classes=5, seed=2, rank=0, cutmix=1.0)
    aug.set_epoch(0)
    for (x, y), (xc, t) in zip(_inputs(_Fake()), aug):
        from_flip = (xc == x.flip(0)).all(dim=1) & (xc != x).any(dim=1)  # (B, H, W)
        assert torch.equal(xc, torch.where(from_flip[:, None], x.flip(0), x))
        box = from_flip[0]
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if len(rows):  # one rectangle, the same in every sample
            assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and (from_flip == box).all()
        lam = 1 - box.double().mean().item()
        torch.testing.assert_close(t.double(), smooth_mix(y, 5, lam, 0.0), rtol=0, atol=1e-6)


def test_resumed_mid_epoch_is_bit_identical_and_globals_untouched():
    def wrapped():
        return BatchAugment(_Fake(), num_classes=5, seed=7, rank=1, reprob=0.5, mixup=0.8, cutmix=1.0,
                            label_smoothing=0.1)
    full = wrapped()
    full.set_epoch(2)
    before = _globals()
    want = [(x.clone(), t.clone()) for x, t in full]
    assert _same_globals(before, _globals())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)  # whatever the global state of the resumed run
    resumed = wrapped()
    resumed.set_epoch(2, start_batch=1)
    got = list(resumed)
    assert len(got) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want[1:]))
    other = BatchAugment(_Fake(), num_classes=5, seed=7, rank=0, reprob=0.5, mixup=0.8, cutmix=1.0)
    other.set_epoch(2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(other, want))  # another rank draws other boxes


def test_odd_batch_and_random_erasing_alone():
    aug = BatchAugment(_Fake(sizes=(5,)), num_classes=5, seed=0, rank=0, mixup=1.0, label_smoothing=0.2)
    (x, y), = _inputs(_Fake(sizes=(5,)))
    (xm, t), = list(aug)
    assert t.shape == (5, 5) and torch.equal(xm[4], x[4])  # the odd sample out keeps its image
    torch.testing.assert_close(t[4].double(), smooth_mix(y[4:], 5, 1.0, 0.2)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(t.sum(1), torch.ones(5))
    erase = BatchAugment(_Fake(sizes=(8, 8)), num_classes=5, seed=0, rank=0, reprob=1.0)
    for (x, y), (xe, ye) in zip(_inputs(_Fake(sizes=(8, 8))), erase):
        assert torch.equal(ye, y) and ye.dtype == torch.int64  # labels untouched without Mixup
        changed = (xe != x).any(dim=1)
        assert changed.flatten(1).any(1).all() and not changed.all()  # one region per image, not all of it


def test_run_loaders_wrap_only_when_configured_and_loss_smoothing():
    d = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))
    cfg = Config(data=DataConfig(loader="synthetic", batch_size=4, synthetic_train_size=16, img_size=8))
    cfg.model.num_classes = 3
    train, _ = build_run_loaders(cfg, MEAN, STD, d)
    assert type(train).__name__ == "SyntheticLoader" and train_loss_config(cfg) is cfg
    cfg.data.mixup, cfg.data.reprob = 0.8, 0.25
    train, _ = build_run_loaders(cfg, MEAN, STD, d)
    assert isinstance(train, BatchAugment) and len(train) == 4 and train.classes == ["0", "1", "2"]
    train.set_epoch(1, 3)
    (x, t), = list(train)
    assert t.shape == (4, 3) and t.dtype == torch.float32 and train.state_dict() is None
    lc = train_loss_config(cfg)
    assert lc.loss.label_smoothing == 0.0 and cfg.loss.label_smoothing == 0.1 and lc.data is cfg.data


@pytest.mark.parametrize("field, value", [("mixup", -0.1), ("cutmix", -1.0), ("mixup_prob", 1.5),
                                          ("mixup_switch_prob", -0.1), ("reprob", 2.0), ("auto_augment", "rnd-m9")])
def test_config_refuses_bad_values(field, value):
    cfg = Config()
    setattr(cfg.data, field, value)
    with pytest.raises(ConfigError, match=f"^data.{field}: "):
        validate(cfg)


def test_config_mixup_needs_even_drop_batches():
    cfg = Config()
    cfg.data.cutmix, cfg.data.batch_size = 1.0, 63
    with pytest.raises(ConfigError, match="^data.batch_size: must be even"):
        validate(cfg)
    cfg.data.batch_size, cfg.data.last_batch = 64, "partial"
    with pytest.raises(ConfigError, match="^data.last_batch: "):
        validate(cfg)
    cfg.data.last_batch, cfg.data.auto_augment, cfg.data.reprob = "drop", RECIPE, 0.25
    validate(cfg)  # DeiT's recipe passes
