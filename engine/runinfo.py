"""What a result was measured on: device, versions, commit; and the atomic JSON writer for results.

Shared by `hcd bench`, `hcd verify` and bench/tile_sweep.py. Imports only torch and the standard library.
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def resolve_device(device, command="verify"):
    """The device to use, or None after printing why the argument is unusable (the caller exits 2)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and device != "cuda" and not device.startswith("cuda:"):
        print(f"hcd {command}: error: --device {device!r} is not cpu or cuda", file=sys.stderr)
        return None
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"hcd {command}: error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return None
    return device


def versions() -> dict:
    from importlib import metadata
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "timm", "deepspeed", "nvidia-dali-cuda120"):  # metadata only: imports nothing
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = None
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v


def commit() -> str:
    """The checkout's short hash (+ "-dirty"); HCD_COMMIT when the tree travelled without .git (a GPU box)."""
    if os.environ.get("HCD_COMMIT"):
        return os.environ["HCD_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}core"


def write_json(path: Path, result: dict) -> None:
    """Atomically (a reader or a crash never sees half a file): a sibling .tmp, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
