"""`hcd data-check PATH`: decode every image of a dataset folder and name every bad file.

PATH is a split (class sub-folders) or a dataset root holding train/ and/or val/ splits. Bad: a file
in a class folder that PIL cannot fully decode, or that is not an image (the loaders ignore such
files, so they are reported rather than silently left out), a stray file beside the class folders, an
empty class folder, a val class folder that train does not have (training would refuse it). Returns 2 if anything is bad, else 0; a missing folder raises DataError.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from hcd.engine.data.corrupt import file_problem
from hcd.engine.data.folder import find_classes, is_image_name
from hcd.engine.errors import DataError

SPLITS = ("train", "val")


def check_file(path: str) -> Optional[str]:
    """None if `path` is a readable, fully decodable image, else the reason."""
    if not is_image_name(path):
        return "not an image file (extension)"
    return file_problem(path)


def _walk_split(folder: Path):
    """(files by class, problems found without decoding: stray files, empty class folders)."""
    classes = find_classes(folder)
    if not classes:
        raise DataError(f"{folder}: no class sub-folders")
    problems = [(str(e.path), "stray file beside the class folders")
                for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
    files = {}
    for name in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
        files[name] = sorted(found)
        if not found:
            problems.append((str(folder / name), "empty class folder"))
    return files, problems


def run_data_check(path, workers: Optional[int] = None) -> int:
    from tqdm import tqdm

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{path}: dataset folder not found")
    splits = [(s, root / s) for s in SPLITS if (root / s).is_dir()] or [(root.name or str(root), root)]
    walked = [(name, folder, *_walk_split(folder)) for name, folder in splits]
    by_name = {w[0]: w for w in walked}
    if "train" in by_name and "val" in by_name:  # the loaders label val with the train classes
        _, val_folder, val_files, val_problems = by_name["val"]
        val_problems.extend((str(val_folder / c), "class folder not among the train classes")
                            for c in val_files if c not in by_name["train"][2])
    all_files = [f for _, _, files, _ in walked for fs in files.values() for f in fs]
    workers = workers or os.cpu_count() or 1
    # Threads suffice: Pillow releases the GIL while it decodes.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        progress = tqdm(pool.map(check_file, all_files), total=len(all_files), desc="decoding",
                        unit="img", file=sys.stderr, disable=None)
        results = dict(zip(all_files, progress))
    bad = []
    for name, folder, files, problems in walked:
        n_ok = sum(1 for fs in files.values() for f in fs if results[f] is None)
        print(f"{name}: {n_ok} images in {len(files)} classes ({folder})")
        bad.extend(problems)
        bad.extend((f, results[f]) for fs in files.values() for f in fs if results[f] is not None)
    for f, reason in bad:
        print(f"BAD {f}: {reason}")
    print(f"{len(bad)} bad file(s)" if bad else "all images decode")
    return 2 if bad else 0
