"""Folders of PNG/JPEG images: `load_image_folder` → N × C × S × S uint8 (Pillow)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vdm.data.errors import DatasetError


#: File name endings read by :func:`load_image_folder` (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _image_to_array(path: Path, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.int64)
                if im.mode == "I" and a.max(initial=0) < 256:
                    a8 = a.astype(np.uint8)
                else:  # 16-bit: to 8 bits, rounded
                    a8 = ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
                im = Image.fromarray(a8, mode="L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)  # alpha over white
            im = im.convert("L" if channels == 1 else "RGB")
            a = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise DatasetError(path, f"image too large ({e})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(path, f"unreadable or truncated image ({type(e).__name__}: {e})") from e
    return a[:, :, None] if a.ndim == 2 else a


def load_image_folder(
    root: str | os.PathLike,
    split: str = "all",
    *,
    image_size: int = 32,
    channels: int = 3,
):
    """Every PNG/JPEG under a folder (recursively, sorted by relative path), cut
    into non-overlapping ``image_size`` x ``image_size`` tiles in raster order
    (the bottom/right remainder is dropped; images smaller than a tile give none).

    ``split``: 'all' reads ``root`` itself; any other split ('train', 'test', ...)
    reads the sub-folder ``root/<split>`` and is an error if it does not exist
    (a folder is never silently reused as both train and test data).

    ``channels=3``: grey images are replicated to RGB; ``channels=1``: colour
    images are converted to luma (ITU-R 601-2, Pillow's "L").  Transparent
    pixels are composited over white; 16-bit images are scaled to 8 bits.

    Returns ``N x channels x image_size x image_size`` uint8.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if root is None:
        raise DatasetError(None, "a folder dataset needs root=<folder of PNG/JPEG images>")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "no such folder")
    folder = root if split == "all" else root / split
    if not folder.is_dir():
        raise DatasetError(folder, f"no such folder: split {split!r} reads {folder}; use split='all' to read {root}")
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise DatasetError(folder, f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    from vdm.data.photos import tile_image

    tiles = []
    for p in files:
        a = _image_to_array(p, channels)
        t = tile_image(a, image_size)
        if len(t):
            tiles.append(t)
    if not tiles:
        raise DatasetError(folder, f"no image here is at least {image_size}x{image_size} pixels")
    return np.ascontiguousarray(np.concatenate(tiles).transpose(0, 3, 1, 2))
