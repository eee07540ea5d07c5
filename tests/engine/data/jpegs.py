"""A small generated JPEG dataset whose pixels say which sample they are.

Every image is one solid colour: R = 40 + 80 * class, G = 5 + 6 * sample id (ids < 42), B = 128. Crops, flips and
resizes keep a solid image solid, so after un-normalising a batch we can read back each sample's class
and id, whatever the augmentation: that is how the tests check labels, shards and order.
"""
import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ["cat", "ant", "bee"]          # deliberately unsorted: labels follow sorted names
SORTED = sorted(CLASSES)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 4


def write_split(folder, per_class, first_id):
    sid = first_id
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for _ in range(per_class):
            w, h = 24 + (sid * 7) % 40, 20 + (sid * 11) % 40   # varied sizes and aspect ratios
            colour = (40 + 80 * SORTED.index(name), 5 + 6 * sid, 128)
            Image.new("RGB", (w, h), colour).save(folder / name / f"img{sid:03d}.jpg", quality=95)
            sid += 1
    return sid


def loader_order(first_id, per_class):
    """Sample ids in the loaders' file order: class folders sorted by name, files sorted in each."""
    ids = {name: list(range(first_id + k * per_class, first_id + (k + 1) * per_class))
           for k, name in enumerate(CLASSES)}
    return [i for name in SORTED for i in ids[name]]


def identify(images: torch.Tensor):
    """(classes, ids) of a normalised batch of solid images, plus the largest in-image pixel spread."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    px = (images.float().cpu() * std + mean) * 255
    colour = px.mean(dim=(2, 3))
    spread = (px - colour[:, :, None, None]).abs().amax().item()
    classes = ((colour[:, 0] - 40) / 80).round().long()
    ids = ((colour[:, 1] - 5) / 6).round().long()
    return classes.tolist(), ids.tolist(), spread


def ids_of(loader):
    """Sample ids of one pass, checking every label against the image's class."""
    out = []
    for images, labels in loader:
        classes, ids, _ = identify(images)
        assert classes == labels.tolist()
        out.extend(ids)
    return out


def dali_importable():
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_importable(), reason="nvidia.dali is not importable"))]


def jpeg_with_garbage_body(path):
    """Valid JPEG start, garbage after: passes the magic-byte check and fails in the decoder."""
    rng = np.random.default_rng(0)
    path.write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(3000))


def truncated_jpeg(path, src):
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])
