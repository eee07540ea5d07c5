"""Telling corrupt files apart, and the `data.on_corrupt` policy (error | skip) applied to them; the DALI
loader's helpers for naming them (DALI's own errors name no file)."""
import io
import logging
import os
import re
import tempfile
from typing import Optional

from hcd.engine.errors import DataError

log = logging.getLogger("hcd.data")


def looks_like_image(head: bytes) -> bool:
    """Magic bytes of the formats the loaders read. A cheap first filter: files failing it never reach
    a decoder (a DALI decode error costs a pipeline rebuild)."""
    return (head[:3] == b"\xff\xd8\xff"                                  # JPEG
            or head[:8] == b"\x89PNG\r\n\x1a\n"                          # PNG
            or head[:2] == b"BM"                                         # BMP
            or head[:4] in (b"II*\x00", b"MM\x00*")                      # TIFF
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")           # WebP
            or (len(head) > 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace()))


def decode_problem(data: bytes) -> Optional[str]:
    """None if PIL fully decodes `data` to RGB, else a short reason. Full decode, not verify(): a
    truncated JPEG passes verify() and fails only when its pixels are read."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
        return None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        return short_reason(e)


def short_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # its str() repeats the path the caller names anyway
        return f"{type(e).__name__}: {e.strerror}"
    msg = str(e).splitlines()[0] if str(e) else ""
    msg = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", msg).strip()  # the address says nothing
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class CorruptPolicy:
    """on_corrupt=error: the first bad file raises DataError naming it. skip: the sample is dropped from
    its batch, `skipped` counts every drop (so a bad file counts once per epoch), a warning is logged
    the first time each file is seen, and `bad` remembers it so later epochs skip it without reading."""

    def __init__(self, mode: str):
        if mode not in ("error", "skip"):
            raise ValueError(f"data.on_corrupt: {mode!r} is not one of 'error', 'skip'")
        self.mode = mode
        self.skipped = 0
        self.bad = {}  # path -> reason

    def report(self, path: str, reason: str, count: bool = True) -> None:
        """count=False: the caller counts the drops itself (the DALI loader, when it drops the sample)."""
        if self.mode == "error":
            raise DataError(f"{path}: corrupt or unreadable image ({reason}); "
                            "fix or remove it, or set data.on_corrupt: skip")
        if path not in self.bad:
            log.warning("skipping corrupt image %s (%s)", path, reason)
            self.bad[path] = reason
        self.skipped += int(count)

    def all_bad(self, first_path: str) -> DataError:
        # Dropping a whole batch would give this rank fewer steps than the others (collectives hang).
        return DataError(f"{first_path}: every image of a batch is corrupt (this is its first); "
                         "run `hcd data-check` on the dataset")


def file_problem(path: str):
    """None if PIL fully decodes the file, else a short reason (unreadable files included)."""
    try:
        with open(path, "rb") as f:
            return decode_problem(f.read())
    except OSError as e:
        return short_reason(e)


def pipeline_error_reason(err: BaseException) -> str:
    """The useful last line of a DALI pipeline error (DALI names no file in it)."""
    # DALI's message starts with "Critical error in pipeline:" lines and the operator's traceback.
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Critical error", "Current pipeline", "File ", "which was"))]
    return (useful or lines or [type(err).__name__])[-1]


def placeholder_jpeg() -> str:
    """A small valid JPEG in a temporary file (removed at exit): stands in for corrupt files in DALI's list."""
    from PIL import Image
    fd, path = tempfile.mkstemp(prefix="hcd-dali-placeholder-", suffix=".jpg")
    with os.fdopen(fd, "wb") as f:
        Image.new("RGB", (16, 16), (128, 128, 128)).save(f, format="JPEG")
    return path
