"""The training presets shipped with vdm: one TOML file each (read by `vdm.config.load_preset`)."""

from __future__ import annotations

from importlib import resources


def preset_names() -> list[str]:
    """Names of the presets shipped in `vdm/presets/*.toml`."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))
