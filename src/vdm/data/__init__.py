"""Datasets as ``N x C x H x W`` uint8 numpy arrays (numpy + Pillow only; no torch).

Entry point: :func:`load_dataset`.  See ``docs/data.md`` for the photos, splits,
licences and file formats.
"""

from __future__ import annotations

import os

import numpy as np

from vdm.data.errors import DatasetError
from vdm.data.cifar import RestrictedUnpickler, load_cifar10, restricted_loads
from vdm.data.folder import IMAGE_EXTENSIONS, load_image_folder
from vdm.data.idx import FASHION_MNIST_ROOT, load_fashion_mnist, load_mnist, read_idx
from vdm.data.imagenet import load_imagenet
from vdm.data.photos import (
    DEFAULT_MAX_TILES_PER_PHOTO,
    PHOTO_NAMES,
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    downscale,
    embedded_photos,
    photo_tiles,
    tile_image,
)
from vdm.data.scenes import PHOTO_DATASETS, photo_scales
from vdm.data.wallpapers import TEST_WALLPAPERS, TRAIN_WALLPAPERS, wallpaper_photos, wallpaper_tiles

__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "load_dataset",
    "embedded_photos",
    "photo_tiles",
    "PHOTO_NAMES",
    "TRAIN_PHOTOS",
    "TEST_PHOTOS",
    "DEFAULT_MAX_TILES_PER_PHOTO",
    "downscale",
    "tile_image",
    "wallpaper_photos",
    "photo_scales",
    "PHOTO_DATASETS",
    "wallpaper_tiles",
    "TRAIN_WALLPAPERS",
    "TEST_WALLPAPERS",
    "read_idx",
    "load_mnist",
    "load_fashion_mnist",
    "FASHION_MNIST_ROOT",
    "RestrictedUnpickler",
    "restricted_loads",
    "load_cifar10",
    "load_imagenet",
    "load_image_folder",
    "IMAGE_EXTENSIONS",
]

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES = ("photos", "wallpapers", "photos+wallpapers", "fashion_mnist", "mnist", "cifar10", "imagenet32", "imagenet64", "folder")

# Datasets whose image size is fixed by the files.
_NATIVE_SIZE = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32, "imagenet32": 32, "imagenet64": 64}


def load_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    channels: int = 3,
) -> np.ndarray:
    """Load a dataset as an ``N x C x H x W`` uint8 C-contiguous array (a new array).

    name:
      * ``"photos"``: the embedded photo tiles (no ``root``); ``image_size`` is the
        tile size (default 32); splits 'train', 'test', 'all'.
      * ``"wallpapers"``: tiles of the photographs of Debian's wallpaper packages
        (:mod:`vdm.data.wallpapers`; no ``root``); like ``"photos"``.
      * ``"photos+wallpapers"``: both, the photos' tiles first.
      * ``"fashion_mnist"``: IDX files in ``root`` (default the Debian package's
        ``/usr/share/datasets/fashion-mnist``); ``N x 1 x 28 x 28``.
      * ``"mnist"``: IDX files in ``root`` (required); ``N x 1 x 28 x 28``.
      * ``"cifar10"``: ``root`` = ``cifar-10-python.tar.gz`` or a folder with it or
        with ``cifar-10-batches-py/``; ``N x 3 x 32 x 32``.
      * ``"imagenet32"`` / ``"imagenet64"``: ``root`` = a folder of ``.npz`` batches
        or one ``.npz``; ``N x 3 x S x S``; 'val' is accepted for 'test'.
      * ``"folder"``: PNG/JPEG files under ``root`` (``split='all'``) or
        ``root/<split>``, tiled to ``image_size`` (default 32); ``channels`` 3 or 1.

    For the fixed-size datasets ``image_size`` may be left out; if given it must
    equal the size of the files (nothing is resized).  Missing, truncated or
    malformed files raise :class:`DatasetError` naming the file.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASET_NAMES)}")
    if name in _NATIVE_SIZE:
        native = _NATIVE_SIZE[name]
        if image_size is not None and int(image_size) != native:
            raise ValueError(f"dataset {name!r} has {native}x{native} images, image_size={image_size} was asked for")
    size = 32 if image_size is None else int(image_size)

    if name == "photos":
        if root is not None:
            raise ValueError("the embedded 'photos' dataset takes no root")
        x = photo_tiles(split, tile_size=size)
    elif name == "wallpapers":
        if root is not None:
            raise ValueError("the 'wallpapers' dataset reads Debian's installed wallpaper packages and takes no root")
        x = wallpaper_tiles(split, tile_size=size)
    elif name == "photos+wallpapers":
        if root is not None:
            raise ValueError("the 'photos+wallpapers' dataset takes no root")
        x = np.concatenate([photo_tiles(split, tile_size=size), wallpaper_tiles(split, tile_size=size)])
    elif name == "fashion_mnist":
        x = load_fashion_mnist(split, FASHION_MNIST_ROOT if root is None else root)
    elif name == "mnist":
        x = load_mnist(split, root)
    elif name == "cifar10":
        x = load_cifar10(split, root)
    elif name in ("imagenet32", "imagenet64"):
        x = load_imagenet(split, root, _NATIVE_SIZE[name])
    else:
        x = load_image_folder(root, split, image_size=size, channels=channels)
    return np.ascontiguousarray(x, dtype=np.uint8)
