"""Overriding a config section's fields from keyword arguments, failing on unknown ones."""

import ml_collections

from frcnn_jax.errors import ConfigError


def override(c, overrides, section):
    """Set `overrides` on ConfigDict `c` (the section named `section`, e.g. "config.data"),
    recursing into nested sections given as dicts; `ConfigError` naming an unknown field
    (`ConfigDict.update` would add it silently)."""
    for name, value in overrides.items():
        if name not in c:
            raise ConfigError(f"{section} has no field {name!r}; known: {sorted(c.keys())}")
        if isinstance(c[name], ml_collections.ConfigDict) and isinstance(value, dict):
            override(c[name], value, f"{section}.{name}")
        else:
            c[name] = value
