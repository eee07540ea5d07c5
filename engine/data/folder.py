"""ImageNet-style split folders: class sub-folders (sorted names -> labels 0..K-1) or a file list.

A file list has one "relative/path label" per line (path relative to the split folder; blank lines and
lines starting with # are ignored). Problems raise DataError naming the folder, file or list line.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from hcd.engine.errors import DataError

# Lower-case; ImageNet's own files end in ".JPEG". Other files are ignored by the loaders (as
# torchvision's ImageFolder does) and reported by `hcd data-check`.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


@dataclass(frozen=True)
class Split:
    """One split: absolute file paths, int64 labels (same length), class names (index = label)."""
    paths: list
    labels: np.ndarray
    classes: list
    source: str  # the folder or list file it came from, for messages

    def __len__(self):
        return len(self.paths)


def find_classes(folder: Path) -> list:
    """Sorted names of the visible sub-folders."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _class_files(class_dir: str) -> list:
    """Image files under one class folder (recursively, like ImageFolder), sorted for a stable order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_name(f))
    return out


def scan_folder(folder: Path, classes: Optional[Sequence[str]] = None) -> Split:
    """Class sub-folders of `folder`. With `classes` (the train split's), labels follow that mapping
    and a sub-folder that is not one of them is an error (val must not invent classes)."""
    found = find_classes(folder)
    if not found:
        raise DataError(f"{folder}: no class sub-folders")
    if classes is None:
        classes = found
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in found:
        if name not in index:
            raise DataError(f"{folder / name}: class folder not among the train classes")
        files = _class_files(os.path.join(folder, name))
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    if not paths:
        raise DataError(f"{folder}: no image files in its class folders")
    return Split(paths, np.asarray(labels, dtype=np.int64), list(classes), str(folder))


def read_list(list_file: Path, folder: Path, classes: Optional[Sequence[str]] = None) -> Split:
    """A "relative/path label" list. Class names come from `classes`, else the folder's class
    sub-folders (labels must index them), else (a flat folder) the label numbers. Files are not stat'ed here (a million stats on a network
    file system is slow): a missing file fails when it is read, naming it."""
    if not list_file.is_file():
        raise DataError(f"{list_file}: file list not found")
    paths, labels = [], []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)  # rsplit: paths may contain spaces
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{list_file}:{lineno}: expected 'relative/path label', got {line!r}")
            paths.append(os.path.join(folder, parts[0]))
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"{list_file}: file list is empty")
    labels = np.asarray(labels, dtype=np.int64)
    if classes is None:
        classes = find_classes(folder) if folder.is_dir() else []
        if not classes:  # a flat folder: the label numbers are the class names
            classes = [str(i) for i in range(int(labels.max()) + 1)]
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        raise DataError(f"{list_file}: label {labels[bad[0]]} of {paths[bad[0]]} outside 0..{len(classes) - 1}")
    return Split(paths, labels, list(classes), str(list_file))


def load_split(root: str, split_dir: str, list_file: Optional[str] = None,
               classes: Optional[Sequence[str]] = None) -> Split:
    """root/split_dir as class folders, or the list file (absolute, or relative to root)."""
    root = Path(root).expanduser()
    folder = root / split_dir
    if list_file is not None:
        lf = Path(list_file).expanduser()
        return read_list(lf if lf.is_absolute() else root / lf, folder, classes)
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder not found")
    return scan_folder(folder, classes)
