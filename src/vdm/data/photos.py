"""The embedded photo dataset: real colour photographs shipped inside the
scikit-image and scikit-learn wheels, cut into tiles at load time.

Recipe (deterministic, nothing downloaded, no image files in this repository):

* the 11 colour photos of :data:`PHOTO_NAMES` (uint8 RGB);
* each at three scales: native, 2x and 4x smaller.  A k-times smaller scale is
  the exact integer k x k box average of the native pixels, rounded half up
  (``(sum + k*k // 2) // (k*k)``); rows/columns that do not fill a whole
  k x k block are dropped;
* non-overlapping ``tile_size`` x ``tile_size`` tiles in raster order from the
  top-left corner of each scale (the right/bottom remainder is dropped);
* "flat" tiles whose pixel standard deviation (over all pixels and channels)
  is below ``min_std`` (default 4) are dropped;
* at most ``max_tiles_per_photo`` (default :data:`DEFAULT_MAX_TILES_PER_PHOTO`)
  tiles per photo, all scales together: when a photo has more, an evenly spaced
  subset of its tile list (native, then 2x, then 4x; raster order) is kept.
  Without a cap ``retina`` (2,097 tiles) and ``hubble_deep_field`` (1,074) would
  be 74% of the training set; with 500 each is about 23% of it, and no test
  photo (at most 437 tiles) is capped;
* split BY PHOTO: :data:`TEST_PHOTOS` (coffee, rocket, flower and both views of
  the stereo motorcycle pair) form the test split, the rest the train split.
  No photo, hence no tile, is in both.

Only numpy and Pillow (through scikit-learn) are used here; torch is not imported.
"""

from __future__ import annotations

import functools

import numpy as np

from vdm.data.errors import DatasetError

__all__ = [
    "PHOTO_NAMES",
    "TRAIN_PHOTOS",
    "TEST_PHOTOS",
    "DEFAULT_MAX_TILES_PER_PHOTO",
    "SCALES",
    "embedded_photos",
    "photo_tiles",
    "downscale",
    "tile_image",
]

#: Photos of the test split (the stereo pair is kept together).
TEST_PHOTOS: tuple[str, ...] = ("coffee", "rocket", "flower", "motorcycle_left", "motorcycle_right")
#: Photos of the train split.
TRAIN_PHOTOS: tuple[str, ...] = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "china")
#: All embedded photos, in the (deterministic) order used everywhere.
PHOTO_NAMES: tuple[str, ...] = TRAIN_PHOTOS + TEST_PHOTOS
#: Downscaling factors used for the tiles.
SCALES: tuple[int, ...] = (1, 2, 4)
#: Default cap on tiles per photo (all scales together).
DEFAULT_MAX_TILES_PER_PHOTO = 500
#: Tiles whose pixel standard deviation is below this are dropped.
DEFAULT_MIN_STD = 4.0


def _load_one(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    elif name.startswith("motorcycle_"):
        import skimage.data

        left, right, _disp = skimage.data.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    img = np.ascontiguousarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise DatasetError(None, f"embedded photo {name!r} is {img.dtype} {img.shape}, expected HxWx3 uint8")
    return img


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    img = _load_one(name)
    img.setflags(write=False)
    return img


def _names_for(split: str) -> tuple[str, ...]:
    if split == "train":
        return TRAIN_PHOTOS
    if split == "test":
        return TEST_PHOTOS
    if split == "all":
        return PHOTO_NAMES
    raise ValueError(f"unknown split {split!r} for the embedded photos: use 'train', 'test' or 'all'")


def embedded_photos(split: str = "test") -> dict[str, np.ndarray]:
    """The whole photos of a split, full size: ``{name: HxWx3 uint8}``.

    The arrays are shared and read-only (copy them before writing).  The dict is
    ordered as :data:`TRAIN_PHOTOS` / :data:`TEST_PHOTOS`; ``split="all"`` gives
    train then test photos.
    """
    return {name: _photo(name) for name in _names_for(split)}


def downscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Exact integer ``factor x factor`` box average of a HxWxC uint8 image,
    rounded half up.  Incomplete blocks at the bottom/right are dropped."""
    if factor == 1:
        return img
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    h, w = img.shape[0] // factor, img.shape[1] // factor
    blocks = img[: h * factor, : w * factor].reshape(h, factor, w, factor, *img.shape[2:])
    s = blocks.sum(axis=(1, 3), dtype=np.int64)
    n = factor * factor
    return ((s + n // 2) // n).astype(np.uint8)


def tile_image(img: np.ndarray, tile_size: int) -> np.ndarray:
    """Non-overlapping tiles of a HxWxC image in raster order: ``N x tile x tile x C``
    (the bottom/right remainder is dropped)."""
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    ny, nx = img.shape[0] // tile_size, img.shape[1] // tile_size
    c = img.shape[2]
    t = img[: ny * tile_size, : nx * tile_size].reshape(ny, tile_size, nx, tile_size, c)
    return t.transpose(0, 2, 1, 3, 4).reshape(ny * nx, tile_size, tile_size, c)


def _photo_tiles_one(name: str, tile_size: int, min_std: float, cap: int | None) -> tuple[np.ndarray, list]:
    img = _photo(name)
    tiles, info = [], []
    for k in SCALES:
        small = downscale(img, k)
        t = tile_image(small, tile_size)
        if len(t) == 0:
            continue
        nx = small.shape[1] // tile_size
        std = t.reshape(len(t), -1).astype(np.float64).std(axis=1)
        keep = np.flatnonzero(std >= min_std)
        tiles.append(t[keep])
        info.extend((name, k, int(i // nx) * tile_size, int(i % nx) * tile_size) for i in keep)
    if not tiles:
        return np.zeros((0, tile_size, tile_size, 3), np.uint8), []
    allt = np.concatenate(tiles)
    if cap is not None and len(allt) > cap:
        idx = np.unique(np.linspace(0, len(allt) - 1, cap).round().astype(np.int64))
        allt = allt[idx]
        info = [info[i] for i in idx]
    return allt, info


def photo_tiles(
    split: str = "train",
    *,
    tile_size: int = 32,
    max_tiles_per_photo: int | None = DEFAULT_MAX_TILES_PER_PHOTO,
    min_std: float = DEFAULT_MIN_STD,
    return_info: bool = False,
):
    """Tiles of the embedded photos of ``split`` ('train', 'test' or 'all').

    Returns an ``N x 3 x tile_size x tile_size`` uint8 C-contiguous array (a new
    array on every call).  With ``return_info=True`` returns ``(tiles, info)``
    where ``info[i] = (photo_name, scale_factor, y, x)`` locates tile ``i``
    (``y, x``: top-left corner in the downscaled photo).  ``max_tiles_per_photo=None``
    disables the cap.  The order is deterministic: photos in split order, then
    scales native, 2x, 4x, then raster order.
    """
    if max_tiles_per_photo is not None and max_tiles_per_photo < 1:
        raise ValueError(f"max_tiles_per_photo must be >= 1 or None, got {max_tiles_per_photo}")
    parts, info = [], []
    for name in _names_for(split):
        t, i = _photo_tiles_one(name, int(tile_size), float(min_std), max_tiles_per_photo)
        parts.append(t)
        info.extend(i)
    tiles = np.concatenate(parts) if parts else np.zeros((0, tile_size, tile_size, 3), np.uint8)
    out = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))
    return (out, info) if return_info else out
