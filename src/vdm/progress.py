"""Progress bars: one place that builds them, so that "no bar" is tqdm's own disabled bar, not a stand-in."""

from __future__ import annotations


def progress_bar(enabled: bool, *, desc: str, unit: str, total: int | None = None, **options):
    """A tqdm bar (`options` go to tqdm, e.g. `initial`, `leave`); when not `enabled`, tqdm's disabled bar,
    whose `update`, `set_postfix` and `close` do nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, **options)
