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
    """A size from ``dask.config`` (``"16MiB"`` or an int), in bytes; a ValueError naming the
    key for anything else."""
    value = dask.config.get(key)
    try:
        size = int(dask.utils.parse_bytes(value)) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"The dask config {key}={value!r} is not a size ({error}).") from None
    if size < 0:
        raise ValueError(f"The dask config {key}={value!r} is not a size (it is negative).")
    return size


_load_defaults()
