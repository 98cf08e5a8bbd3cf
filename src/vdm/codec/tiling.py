"""How images are cut into the pieces (*units*) that walk the latent chain, and how units form stages.

An image (C_img, H, W) is coded as one or more *planes* of the model's channel count C: the image itself when
C_img = C; each channel on its own when the model is grey (C = 1); a grey image repeated three times for a
colour model (C = 3, decoded back from the first plane). Each plane is cut into `tile`×`tile` tiles in raster
order (edge tiles are smaller; `tile` = 0 keeps planes whole). The first tiles of the stream are cut into
quadrants, recursively down to `warmup` pixels a side, for as long as the stack cannot lend a whole tile's
worth of bits (`WarmupPlan`); the split decisions are stored in the file.

Units are coded in *stages* of consecutive units; within a stage, units of equal shape share network calls in
batches of at most `batch` units. Encoder and decoder derive the same units and batches from the header.
"""

from __future__ import annotations

from collections import deque
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


def quadrants(unit: Unit) -> list[Unit]:
    """The unit cut in half both ways (up to 4 parts, raster order; a side of 1 is not cut)."""
    hs = [(0, (unit.h + 1) // 2), ((unit.h + 1) // 2, unit.h // 2)] if unit.h > 1 else [(0, 1)]
    ws = [(0, (unit.w + 1) // 2), ((unit.w + 1) // 2, unit.w // 2)] if unit.w > 1 else [(0, 1)]
    return [Unit(unit.image, unit.plane, unit.y + y, unit.x + x, h, w) for y, h in hs for x, w in ws]


def plan_units(shapes: Sequence[tuple[int, int, int]], model_channels: int, tile: int) -> list[Unit]:
    """The tiles of the images with the given (C, H, W) shapes, in coding order (before any warm-up split)."""
    units: list[Unit] = []
    for n, (c, h, w) in enumerate(shapes):
        for p in range(len(plane_channels(c, model_channels))):
            units += [Unit(n, p, y, x, th, tw) for y, x, th, tw in _tiles(h, w, tile)]
    return units


class WarmupPlan:
    """The units in coding order, the first tiles cut into quadrants (recursively) while the stack is too small.

    Bits-back borrows bits from the ANS stack, which starts empty: a unit can only be coded once the stack can
    lend what its pops read (≈ 6–8 bits per sub-pixel), and fresh bits pushed to make up the difference are pure
    overhead. So at first, a unit that does not fit is cut into quadrants, down to `warmup` pixels a side; each
    coded piece grows the stack, and the pieces grow back to whole tiles as it does. The warm-up ends when a
    whole tile is coded uncut. Every unit larger than `warmup` met during the warm-up gets a split flag; the
    encoder decides them (`decide(unit) -> bool`) and stores them in the file, the decoder replays them.
    """

    def __init__(self, tiles: Sequence[Unit], warmup: int, decide):
        self._queue = deque((u, 0) for u in tiles)
        self._warm = warmup > 0
        self.warmup, self._decide, self.flags = warmup, decide, []

    def __iter__(self):
        return self

    def __next__(self) -> Unit:
        while self._queue:
            u, depth = self._queue.popleft()
            if self._warm and max(u.h, u.w) > self.warmup:
                split = bool(self._decide(u))
                self.flags.append(split)
                if split:
                    self._queue.extendleft(reversed([(q, depth + 1) for q in quadrants(u)]))
                    continue
                if depth == 0:
                    self._warm = False
            return u
        raise StopIteration


def replay_units(tiles: Sequence[Unit], warmup: int, flags: Sequence[bool]) -> list[Unit]:
    """The units an encoder coded, from its split flags (raises ValueError if they do not fit the tiles)."""
    it = iter(flags)

    def decide(_):
        try:
            return next(it)
        except StopIteration:
            raise ValueError("too few warm-up split flags") from None

    plan = WarmupPlan(tiles, warmup, decide)
    units = list(plan)
    if len(plan.flags) != len(flags):
        raise ValueError("too many warm-up split flags")
    return units


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
