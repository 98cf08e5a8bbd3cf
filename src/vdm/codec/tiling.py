"""How images are cut into the pieces (*units*) that walk the latent chain, and how units form stages.

An image (C_img, H, W) is coded as one or more *planes* of the model's channel count C: the image itself when
C_img = C; each channel on its own when the model is grey (C = 1); a grey image repeated three times for a
colour model (C = 3, decoded back from the first plane). Each plane is cut into `tile`×`tile` tiles in raster
order (edge tiles are smaller; `tile` = 0 keeps planes whole). The first tiles of the stream (as many as the
encoder needs, recorded in the file as `warm_tiles`) are cut further into `warmup`×`warmup` pieces: bits-back
borrows bits from the stack, which starts empty, and smaller units borrow fewer (see
`bitsback.deficit_bits_per_dim`); the stack grows as pieces are coded until it can lend a whole tile's worth.
With `tile` = 0 the first units are whole planes, so a non-zero `warmup` cuts those planes into pieces.

Units are coded in *stages* of consecutive units; within a stage, units of equal shape share network calls in
batches of at most `batch` units. Encoder and decoder derive the same units and batches from the header.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Unit:
    """A tile of one plane of one image: rows y:y+h, columns x:x+w of plane `plane` of image `image`."""

    image: int
    plane: int
    y: int
    x: int
    h: int
    w: int


def plane_channels(image_channels: int, model_channels: int) -> list[list[int]]:
    """For each plane, the image channels it holds (length = model_channels)."""
    if image_channels == model_channels:
        return [list(range(image_channels))]
    if model_channels == 1:
        return [[c] for c in range(image_channels)]
    if image_channels == 1:
        return [[0] * model_channels]
    raise ValueError(f"cannot code {image_channels}-channel images with a {model_channels}-channel model")


def _tiles(h: int, w: int, tile: int) -> list[tuple[int, int, int, int]]:
    th, tw = (h, w) if tile <= 0 else (tile, tile)
    return [(y, x, min(th, h - y), min(tw, w - x)) for y in range(0, h, th) for x in range(0, w, tw)]


def split_unit(unit: Unit, warmup: int) -> list[Unit]:
    """The `warmup`×`warmup` pieces of a unit in raster order (the unit itself if it is not larger)."""
    if not 0 < warmup < max(unit.h, unit.w):
        return [unit]
    return [Unit(unit.image, unit.plane, unit.y + y, unit.x + x, th, tw)
            for y, x, th, tw in _tiles(unit.h, unit.w, warmup)]


def plan_units(shapes: Sequence[tuple[int, int, int]], model_channels: int, tile: int, warmup: int,
               warm_tiles: int = 1) -> list[Unit]:
    """All units of the images with the given (C, H, W) shapes, in coding order; the first `warm_tiles` tiles
    are cut into `warmup`×`warmup` pieces."""
    units: list[Unit] = []
    for n, (c, h, w) in enumerate(shapes):
        for p in range(len(plane_channels(c, model_channels))):
            units += [Unit(n, p, y, x, th, tw) for y, x, th, tw in _tiles(h, w, tile)]
    return [piece for u in units[:warm_tiles] for piece in split_unit(u, warmup)] + units[warm_tiles:]


def extract(images: Sequence[np.ndarray], unit: Unit, model_channels: int) -> np.ndarray:
    """The unit's pixels, (C, h, w), from images given as (C_img, H, W) arrays."""
    img = images[unit.image]
    chans = plane_channels(img.shape[0], model_channels)[unit.plane]
    return img[chans, unit.y:unit.y + unit.h, unit.x:unit.x + unit.w]


def place(images: list[np.ndarray], unit: Unit, pixels: np.ndarray, model_channels: int) -> None:
    """Write a decoded unit (C, h, w) back into its image (inverse of `extract`; repeated planes keep one copy)."""
    img = images[unit.image]
    chans = plane_channels(img.shape[0], model_channels)[unit.plane]
    for j, c in enumerate(dict.fromkeys(chans)):
        img[c, unit.y:unit.y + unit.h, unit.x:unit.x + unit.w] = pixels[chans.index(c)]


def shape_groups(units: Sequence[Unit]) -> list[list[int]]:
    """Indices of the units grouped by (h, w), groups in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for j, u in enumerate(units):
        groups.setdefault((u.h, u.w), []).append(j)
    return list(groups.values())
