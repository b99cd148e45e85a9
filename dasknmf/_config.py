"""dasknmf's defaults in ``dask.config`` (key ``dasknmf``), read from ``dasknmf.yaml``."""

from __future__ import annotations

import pathlib

import dask.config
import yaml

_DEFAULTS_FILE = pathlib.Path(__file__).with_name("dasknmf.yaml")


def _load_defaults() -> None:
    with _DEFAULTS_FILE.open() as f:
        defaults = yaml.safe_load(f)
    # Values already in the config (from DASK_DASKNMF__... variables or YAML files) win.
    dask.config.update_defaults(defaults)


def get_bytes(key: str) -> int:
    """A size from ``dask.config`` (``"16MiB"`` or an int), in bytes."""
    value = dask.config.get(key)
    return int(dask.utils.parse_bytes(value)) if isinstance(value, str) else int(value)


_load_defaults()
