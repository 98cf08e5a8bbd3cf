"""The `wallpapers` dataset: free-licensed photographs that Debian's desktop wallpaper packages install, cut into
tiles at load time (nothing downloaded, no image files in this repository).

Recipe (deterministic):
* the photographs of :data:`WALLPAPERS` (not the drawings and abstract artwork the packages also hold), each read
  from its package's files: `mate-backgrounds` (`/usr/share/backgrounds/mate/nature/`) and
  `plasma-workspace-wallpapers` (`/usr/share/wallpapers/<Name>/contents/images/`, the largest size shipped);
* each downscaled by exact integer box averaging (:func:`vdm.data.photos.downscale`) by the factors of
  :data:`SCALES` that leave its short side at least :data:`MIN_SHORT_SIDE` pixels: averaging at least 2×2 pixels
  removes most JPEG artefacts, as lossless-codec work on JPEG-sourced photos does (L3C, SReC), and gives
  several scales of each scene;
* non-overlapping tiles in raster order; tiles with pixel standard deviation below 4 dropped; at most
  :data:`MAX_TILES_PER_PHOTO` tiles per photograph, all scales together (an evenly spaced subset);
* split BY PHOTOGRAPH: :data:`TEST_WALLPAPERS` form the test split, the rest the train split.

Licences and authors are listed in docs/data.md. Install the packages with
`apt-get install mate-backgrounds plasma-workspace-wallpapers`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from vdm.data.errors import DatasetError
from vdm.data.photos import DEFAULT_MIN_STD, downscale, tile_image

PACKAGES = {"mate-backgrounds": Path("/usr/share/backgrounds/mate/nature"),
            "plasma-workspace-wallpapers": Path("/usr/share/wallpapers")}
# name: (package, file or folder under the package's directory, author, licence)
WALLPAPERS: dict[str, tuple[str, str, str, str]] = {
    "aqua": ("mate-backgrounds", "Aqua.jpg", "Charles Barbin", "GPL-2+"),
    "blinds": ("mate-backgrounds", "Blinds.jpg", "Lennart Poettering, Andrea Cimitan", "GPL-2+"),
    "dune": ("mate-backgrounds", "Dune.jpg", "Marco Cogoni, Hylke Bons", "GPL-2+"),
    "fresh_flower": ("mate-backgrounds", "FreshFlower.jpg", "Jens Ansorg", "GPL-2+"),
    "garden": ("mate-backgrounds", "Garden.jpg", "Charles Barbin", "GPL-2+"),
    "green_meadow": ("mate-backgrounds", "GreenMeadow.jpg", "Timothy Schellhase, Lapo Calamandrei", "GPL-2+"),
    "lady_bird": ("mate-backgrounds", "LadyBird.jpg", "Charles Barbin", "GPL-2+"),
    "rain_drops": ("mate-backgrounds", "RainDrops.jpg", "blackcombwhistler07", "GPL-2+"),
    "storm": ("mate-backgrounds", "Storm.jpg", "Sergey Nazarov", "GPL-2+"),
    "two_wings": ("mate-backgrounds", "TwoWings.jpg", "Charles Barbin, Hylke Bons", "GPL-2+"),
    "wood": ("mate-backgrounds", "Wood.jpg", "Jean-François Fortin Tam", "GPL-2+"),
    "yellow_flower": ("mate-backgrounds", "YellowFlower.jpg", "Charles Barbin", "GPL-2+"),
    "by_the_water": ("plasma-workspace-wallpapers", "BytheWater", "Maciej Wiklo", "LGPL-3"),
    "cold_ripple": ("plasma-workspace-wallpapers", "ColdRipple", "Risto Saukonpää", "LGPL-3"),
    "colorful_cups": ("plasma-workspace-wallpapers", "ColorfulCups", "Dmitri Popov", "LGPL-3"),
    "darkest_hour": ("plasma-workspace-wallpapers", "DarkestHour", "Risto Saukonpää", "LGPL-3"),
    "evening_glow": ("plasma-workspace-wallpapers", "EveningGlow", "Ian Hex", "LGPL-3"),
    "fallen_leaf": ("plasma-workspace-wallpapers", "FallenLeaf", "Martin Klapetek", "LGPL-3"),
    "grey": ("plasma-workspace-wallpapers", "Grey", "Sigi Sagi", "LGPL-3"),
    "one_stands_out": ("plasma-workspace-wallpapers", "OneStandsOut", "Risto Saukonpää", "LGPL-3"),
    "path": ("plasma-workspace-wallpapers", "Path", "Risto Saukonpää", "LGPL-3"),
    "volna": ("plasma-workspace-wallpapers", "Volna", "Nikita Babin", "CC-BY-SA-4.0"),
    "summer_1am": ("plasma-workspace-wallpapers", "summer_1am", "Risto Saukonpää", "LGPL-3"),
}
#: Photographs of the test split: one of each package's kinds of scene.
TEST_WALLPAPERS: tuple[str, ...] = ("green_meadow", "storm", "colorful_cups", "path", "summer_1am")
TRAIN_WALLPAPERS: tuple[str, ...] = tuple(n for n in WALLPAPERS if n not in TEST_WALLPAPERS)
SCALES: tuple[int, ...] = (2, 3, 4, 6, 8)
MIN_SHORT_SIDE = 192
MAX_TILES_PER_PHOTO = 1000
INSTALL_HINT = "apt-get install mate-backgrounds plasma-workspace-wallpapers"


def wallpaper_file(name: str) -> Path:
    """The image file of wallpaper `name`; `DatasetError` with the install command when it is not there."""
    package, rel, _, _ = WALLPAPERS[name]
    path = PACKAGES[package] / rel
    if path.is_dir():  # a Plasma wallpaper: contents/images/<W>x<H>.<ext>, take the largest
        sizes = []
        for f in (path / "contents" / "images").glob("*"):
            m = re.fullmatch(r"(\d+)x(\d+)\.(jpe?g|png)", f.name)
            if m:
                sizes.append((int(m.group(1)) * int(m.group(2)), f.name, f))
        if sizes:
            return max(sizes)[2]
    elif path.is_file():
        return path
    raise DatasetError(path, f"wallpaper {name!r} is not installed (Debian package {package}: {INSTALL_HINT})")


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    from PIL import Image

    path = wallpaper_file(name)
    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DatasetError(path, f"cannot read the image ({e})") from None
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


def _names_for(split: str) -> tuple[str, ...]:
    names = {"train": TRAIN_WALLPAPERS, "test": TEST_WALLPAPERS, "all": TRAIN_WALLPAPERS + TEST_WALLPAPERS}
    if split not in names:
        raise ValueError(f"unknown split {split!r} for the wallpapers: use 'train', 'test' or 'all'")
    return names[split]


def wallpaper_photos(split: str = "test") -> dict[str, np.ndarray]:
    """The whole photographs of a split, full size: ``{name: H×W×3 uint8}`` (shared, read-only)."""
    return {name: _photo(name) for name in _names_for(split)}


def wallpaper_scales(img: np.ndarray) -> list[np.ndarray]:
    """The box-averaged versions of `img` used for tiles (factors of SCALES, short side ≥ MIN_SHORT_SIDE)."""
    return [downscale(img, k) for k in SCALES if min(img.shape[:2]) // k >= MIN_SHORT_SIDE]


def wallpaper_tiles(split: str = "train", *, tile_size: int = 32) -> np.ndarray:
    """Tiles of the wallpaper photographs of `split`: N × 3 × tile × tile uint8 (see the module's recipe)."""
    out = []
    for name in _names_for(split):
        tiles = [t for small in wallpaper_scales(_photo(name)) if len(t := tile_image(small, tile_size))]
        if not tiles:
            continue
        t = np.concatenate(tiles)
        t = t[t.reshape(len(t), -1).std(axis=1) >= DEFAULT_MIN_STD]
        if len(t) > MAX_TILES_PER_PHOTO:
            t = t[np.unique(np.linspace(0, len(t) - 1, MAX_TILES_PER_PHOTO).round().astype(np.int64))]
        out.append(t)
    if not out:
        return np.zeros((0, 3, tile_size, tile_size), np.uint8)
    return np.ascontiguousarray(np.concatenate(out).transpose(0, 3, 1, 2))
