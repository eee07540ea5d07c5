"""data.auto_augment: timm's RandAugment-style train augmentation for the torch loader, and its DALI counterpart.

Torch loader: the per-image train transform is timm.data.create_transform(is_training=True, auto_augment=...)'s
primary stage (RandomResizedCropAndInterpolation with data.train_interpolation + horizontal flip) and secondary
stage (the auto-augment), on PIL images, returning uint8 as the plain transform does (normalisation and random
erasing happen on the device: base.normalize_uint8, batch_aug). Any timm policy string works there ('rand-...',
'augmix-...', 'original', 'v0', ...). timm draws from python/numpy/torch global RNGs; the loader runs it inside
rng.seeded_globals(seed, epoch, sample, ...), so a sample's augmentation does not depend on the workers. timm's
posterize is swapped for `posterize` below in every op of the policy: Pillow 13 refuses the 0 bits timm asks for at
the top levels (PosterizeIncreasing at magnitude 10, 'v0''s Posterize at level 2), which timm meant as black.

DALI loader: only timm's RandAugment strings, 'rand' with the keys m (magnitude, 0-10, default 10), n (ops per
image, default 2), inc (0/1, default 0) and mstd, are expressed with DALI's auto_aug.rand_augment.apply_rand_augment
on the resized uint8 image. The op list mirrors timm's one for one (TIMM_TO_DALI; DALI's own default suite has an
identity and lacks invert and solarize_add), with timm's level scale (11 magnitude bins: bin m = timm's m / 10
of each op's range) and timm's ranges (rotate 30 deg, shear 0.3, translate 0.45 of the image side, enhance
1 -/+ 0.9, posterize to 4..0 bits when increasing, solarize threshold 256..0, solarize_add 0..110). timm applies
each chosen op with probability 0.5: the DALI list holds every op once plus as many identities, so a uniform draw
is "an op, half the time", the same distribution. What differs:
  - mstd: timm jitters the magnitude per op (gauss(m, mstd), clipped to 0..10); DALI uses the fixed bin m;
  - fill of rotate/shear/translate: timm the dataset mean colour, DALI grey 128; interpolation of those ops:
    timm bilinear-or-bicubic (data.train_interpolation), DALI bilinear;
  - posterize levels: timm floors the bit count, DALI rounds it (the same at m9), and the non-increasing (inc0)
    enhance ops follow DALI's non-monotonic suite (0.1..1.9 without a random sign, as timm's).
Other strings ('original', 'v0', 'augmix', keys p/mmax/t) raise ConfigError for the DALI loader.
"""
import re
from dataclasses import dataclass

from hcd.engine.config_tree import ConfigError

# timm's op (auto_augment._RAND_INCREASING_TRANSFORMS / _RAND_TRANSFORMS) -> the DALI augmentation doing it
TIMM_TO_DALI = {"AutoContrast": "auto_contrast", "Equalize": "equalize", "Invert": "invert", "Rotate": "rotate",
                "Posterize": "posterize", "PosterizeIncreasing": "posterize", "Solarize": "solarize",
                "SolarizeIncreasing": "solarize", "SolarizeAdd": "solarize_add", "Color": "color",
                "ColorIncreasing": "color", "Contrast": "contrast", "ContrastIncreasing": "contrast",
                "Brightness": "brightness", "BrightnessIncreasing": "brightness", "Sharpness": "sharpness",
                "SharpnessIncreasing": "sharpness", "ShearX": "shear_x", "ShearY": "shear_y",
                "TranslateXRel": "translate_x", "TranslateYRel": "translate_y"}
LEVELS = 10           # timm's _LEVEL_DENOM: magnitudes 0..10
TRANSLATE_REL = 0.45  # timm's translate_pct


@dataclass(frozen=True)
class RandAugmentParams:
    m: int = LEVELS     # magnitude 0..10 (timm's default 10)
    n: int = 2          # ops per image
    mstd: float = 0.0   # timm's magnitude std (DALI: not expressed)
    inc: bool = False   # increasing-severity op variants


def parse_rand_augment(text: str) -> RandAugmentParams:
    """timm's 'rand-m9-n2-mstd0.5-inc1' -> RandAugmentParams; ConfigError (data.auto_augment) for what DALI's
    RandAugment cannot express."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"data.auto_augment: {text!r} with the DALI loader: only timm's RandAugment strings "
                          "('rand-m9-mstd0.5-inc1') are supported (set data.loader: torch for other policies)")
    p = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?)", part)
        key, value = match.groups() if match else (part, None)
        if key not in ("m", "n", "mstd", "inc") or key in p:
            raise ConfigError(f"data.auto_augment: {text!r}: section {part!r} is not one of m<int>, n<int>, "
                              "mstd<float>, inc<0|1> (each once) that the DALI loader supports")
        p[key] = float(value) if key == "mstd" else int(float(value))
    out = RandAugmentParams(m=p.get("m", LEVELS), n=p.get("n", 2), mstd=p.get("mstd", 0.0),
                            inc=bool(p.get("inc", 0)))
    if not 0 <= out.m <= LEVELS or out.n < 1 or p.get("inc", 0) not in (0, 1):
        raise ConfigError(f"data.auto_augment: {text!r}: needs m in 0..{LEVELS}, n >= 1, inc 0 or 1")
    return out


# ------------------------------------------------------------------------------------------------- torch

def timm_train_transform(spec):
    """timm's primary (crop + flip) and secondary (auto-augment) PIL stages for `spec` (base.ImageSpec), as one
    callable PIL -> PIL; ConfigError naming data.auto_augment for a policy timm does not know."""
    from timm.data import auto_augment, create_transform
    from torchvision.transforms import Compose
    try:
        primary, secondary, _ = create_transform(spec.img_size, is_training=True, auto_augment=spec.auto_augment,
                                                 interpolation=spec.train_interpolation, re_prob=0.0,
                                                 mean=spec.mean, std=spec.std, separate=True)
    except (AssertionError, ValueError, KeyError) as e:
        raise ConfigError(f"data.auto_augment: {spec.auto_augment!r} is not a timm auto-augment policy "
                          f"({e or type(e).__name__})") from None
    for op in _augment_ops(secondary.transforms):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return Compose([*primary.transforms, *secondary.transforms])


def _augment_ops(transforms) -> list:
    """timm's AugmentOps inside auto-augment transforms: RandAugment's and AugMix's ops, AutoAugment's sub-policies."""
    found = []
    for t in transforms:
        found += list(getattr(t, "ops", []))
        found += [op for sub in getattr(t, "policy", []) for op in sub]
    return found


def posterize(img, bits_to_keep, **_):
    """timm's posterize for every bit count it asks for, 0 to 8. Its PosterizeIncreasing keeps 4 - int(level * 0.4)
    bits, 0 at level 10, which m9 plus its magnitude noise (mstd 0.5) reaches; Pillow 13 refuses 0 bits
    (ValueError) where older Pillow gave what the mask keeps, black. Here 0 bits is black, as with the Pillow timm's
    RandAugment was written for; 1 to 7 bits are Pillow's own posterize."""
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


# -------------------------------------------------------------------------------------------------- DALI

def dali_ops(params: RandAugmentParams) -> list:
    """The DALI augmentations mirroring timm's op list for `params` (see the module docstring), each once,
    followed by as many identities (timm's per-op probability 0.5)."""
    from nvidia.dali.auto_aug import augmentations as a
    translate = [op.augmentation((0, TRANSLATE_REL), True) for op in (a.translate_x, a.translate_y)]  # x image side
    shear_rotate = [a.shear_x.augmentation((0, 0.3), True), a.shear_y.augmentation((0, 0.3), True),
                    a.rotate.augmentation((0, 30), True)]
    if params.inc:
        colour = [op.augmentation((0, 0.9), True, a.shift_enhance_range)
                  for op in (a.brightness, a.contrast, a.color)]
        colour += [a.sharpness.augmentation((0, 0.9), True, a.sharpness_kernel),
                   a.posterize.augmentation((4, 0), False, a.poster_mask_uint8),
                   a.solarize.augmentation((256, 0))]
    else:
        colour = [op.augmentation((0.1, 1.9), False, None) for op in (a.brightness, a.contrast, a.color)]
        colour += [a.sharpness.augmentation((0.1, 1.9), False, a.sharpness_kernel_shifted),
                   a.posterize.augmentation((0, 4), False, a.poster_mask_uint8),
                   a.solarize.augmentation((0, 256), False, None)]
    ops = translate + shear_rotate + colour + [a.solarize_add, a.equalize, a.auto_contrast, a.invert]
    return ops + [a.identity] * len(ops)


def dali_rand_augment(images, params: RandAugmentParams, size: int):
    """RandAugment on a DALI batch of uint8 HWC images of size x size (inside a pipeline built with
    enable_conditionals=True); the ops' randomness comes from the pipeline's seed (checkpointed with it)."""
    from nvidia.dali.auto_aug.rand_augment import apply_rand_augment
    # (DALI 2.4's own sharpness/equalize call deprecated fn.experimental aliases: it warns at build, unfilterably)
    return apply_rand_augment(dali_ops(params), images, params.n, params.m, num_magnitude_bins=LEVELS + 1,
                              shape=(size, size), fill_value=128)
