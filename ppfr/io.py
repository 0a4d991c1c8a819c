"""Files ppfr writes: atomically (temp file in the same folder, fsync, rename), with the umask's mode.

A reader (or a resumed run) never sees a half-written file, and a file that exists after a crash
holds what was written: the data is on disk before the rename makes it visible.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from ppfr.errors import DataError


@functools.cache
def _file_mode() -> int:
    """0666 less the umask: what `open()` would give (mkstemp gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_with(path: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write a file through `fill(binary_file)` atomically: temp file, fsync, umask mode, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write text via a temp file + rename, so readers never see a partial file."""
    write_with(Path(path), lambda f: f.write(text.encode()))


def fsync_dir(path: Path) -> None:
    """Make the renames into `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_png(image: torch.Tensor, path: Path) -> None:
    """A 3 x H x W image in [0,1] as a lossless 8-bit PNG with no metadata, written atomically."""
    array = image.detach().float().cpu().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    write_with(Path(path), lambda f: Image.fromarray(array).save(f, format="PNG"))


def load_png(path: Path) -> torch.Tensor:
    """A PNG as a 3 x H x W float tensor in [0,1]; an unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e})") from e
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)
