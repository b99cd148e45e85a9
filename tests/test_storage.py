"""Locations: local paths made absolute, URLs checked, and their failure modes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from dasknmf import storage
from dasknmf.storage import Location, StorageError


def test_a_relative_path_becomes_absolute_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = storage.location("data/X.zarr")
    assert where == Location(str(tmp_path / "data" / "X.zarr"))
    assert not where.remote and where.path == tmp_path / "data" / "X.zarr"
    assert storage.location(f"file://{tmp_path}/X.zarr").url == f"{tmp_path}/X.zarr"
    assert storage.location("~/X.zarr").url == os.path.expanduser("~/X.zarr")


def test_a_url_stays_a_url_with_its_options():
    pytest.importorskip("s3fs")
    where = storage.location("s3://bucket/X.zarr/", {"anon": True})
    assert where.remote and where.url == "s3://bucket/X.zarr"
    assert where.storage_options == {"anon": True}
    assert where.child("H").url == "s3://bucket/X.zarr/H" and where.name == "X.zarr"
    assert where.parent.url == "s3://bucket"
    with pytest.raises(ValueError, match="is not a local path"):
        where.path  # noqa: B018


@pytest.mark.parametrize(
    "path, error, message",
    [
        (42, TypeError, "Expected a path or a URL, got int"),
        ("nope://bucket/X.zarr", StorageError, "Unknown URL scheme 'nope://'"),
    ],
)
def test_bad_locations(path, error, message):
    with pytest.raises(error, match=message):
        storage.location(path)


def test_atomic_writes_leave_the_old_store_or_the_new_one(tmp_path):
    target = storage.location(tmp_path / "out.zarr")
    with storage.atomic(target) as tmp:
        zarr.create_array(tmp.store(), data=np.ones(3))
    assert zarr.open_array(str(tmp_path / "out.zarr"))[0] == 1
    with (
        pytest.raises(FileExistsError, match="already exists; pass overwrite=True"),
        storage.atomic(target),
    ):
        pass
    with (
        pytest.raises(RuntimeError, match="half way"),
        storage.atomic(target, overwrite=True) as tmp,
    ):
        zarr.create_array(tmp.store(), data=np.zeros(3))
        raise RuntimeError("half way")
    assert zarr.open_array(str(tmp_path / "out.zarr"))[0] == 1  # the old one, untouched
    assert sorted(os.listdir(tmp_path)) == ["out.zarr"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="its folder .* does not exist"):
        storage.check_output(storage.location(tmp_path / "no" / "out.zarr"), False)


def test_missing_chunks_are_those_of_a_complete_store_only(tmp_path):
    complete = zarr.create_array(
        str(tmp_path / "c.zarr"),
        shape=(4, 2),
        chunks=(2, 2),
        dtype="f8",
        config=storage.complete_chunks_config(),
        attributes={storage.CHUNKS_ATTRIBUTE: 2},
    )
    complete[...] = 0.0
    assert storage.missing_chunks(complete, (slice(0, 4), slice(0, 2))) == []
    os.remove(tmp_path / "c.zarr" / "c" / "1" / "0")
    assert storage.missing_chunks(complete, (slice(0, 4), slice(0, 2))) == ["c/1/0"]
    assert storage.missing_chunks(complete, (slice(0, 2), slice(0, 2))) == []
    other = zarr.create_array(str(tmp_path / "o.zarr"), shape=(4, 2), chunks=(2, 2), dtype="f8")
    assert storage.missing_chunks(other, (slice(0, 4), slice(0, 2))) == []  # cannot tell


def test_a_worker_process_checks_the_store_it_opens(tmp_path):
    """``verify`` in this process: the store as opened passes; the same path holding another
    store, or none, fails with the path named."""
    array = zarr.create_array(str(tmp_path / "X.zarr"), shape=(4, 2), chunks=(2, 2), dtype="f8")
    digest = storage.fingerprint(array)
    storage.verify(array, digest, "X.zarr")
    zarr.create_array(
        str(tmp_path / "X.zarr"), shape=(6, 2), chunks=(2, 2), dtype="f8", overwrite=True
    )
    storage._VERIFIED.clear()
    with pytest.raises(
        storage.StoreNotSharedError, match="holds a store whose metadata differ at X.zarr"
    ):
        storage.verify(array, digest, "X.zarr")
    os.remove(tmp_path / "X.zarr" / "zarr.json")
    with pytest.raises(storage.StoreNotSharedError, match="does not see it at X.zarr"):
        storage.verify(array, digest, "X.zarr")
