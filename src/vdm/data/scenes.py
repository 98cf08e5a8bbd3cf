"""Whole training photographs at each of their scales, for random-crop training: `{photo: [H×W×3 uint8, ...]}`.

The scales are those of each dataset's tile recipe (:mod:`vdm.data.photos`: native, 2× and 4× box averages;
:mod:`vdm.data.wallpapers`: the box averages that keep the short side ≥ 192 pixels), so crops and tiles of a
dataset come from the same pixels, split by photograph the same way. ``photos+wallpapers`` is both, the embedded
photos first.
"""

from __future__ import annotations

from vdm.data.photos import SCALES, downscale, embedded_photos
from vdm.data.wallpapers import wallpaper_photos, wallpaper_scales

#: Datasets made of whole photographs (they can be cropped at random).
PHOTO_DATASETS = ("photos", "wallpapers", "photos+wallpapers")


def photo_scales(name: str, split: str) -> dict[str, list]:
    """{photo name: its scaled versions (H×W×3 uint8, largest first)} of dataset `name`, split `split`."""
    if name not in PHOTO_DATASETS:
        raise ValueError(f"dataset {name!r} is not made of whole photographs: use one of {', '.join(PHOTO_DATASETS)}")
    out: dict[str, list] = {}
    if name in ("photos", "photos+wallpapers"):
        out.update({n: [downscale(img, k) for k in SCALES] for n, img in embedded_photos(split).items()})
    if name in ("wallpapers", "photos+wallpapers"):
        out.update({n: wallpaper_scales(img) for n, img in wallpaper_photos(split).items()})
    return out
