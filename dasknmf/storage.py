"""Where stores live: local paths made absolute once, on the driver, and fsspec URLs.

Every path that reaches a worker is a ``Location``: an absolute local path or a URL
(``s3://``, ``gs://``, ``abfs://``, any protocol fsspec knows) with the ``storage_options`` to
reach it. A relative path would be resolved again by each worker in its own directory, where
the store is not: Zarr reads every chunk of a store that is not there as its fill value, and
the fit would go on, on zeros.

Writing is atomic in both worlds. Locally a store is written to a temporary sibling and
renamed into place. An object store has no rename: the temporary prefix is copied into place
(server-side) with the root metadata (``zarr.json``) last, so that the destination is not a
Zarr store until it is complete, and then removed.

This module also checks what workers open (``verify``) and which chunks are missing
(``missing_chunks``); see ``dasknmf.io`` for where they are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import zarr

#: The metadata document at the root of a Zarr v3 node.
ROOT_METADATA = "zarr.json"
#: Attribute of an array written by dasknmf: how many chunks it has, every one of them stored.
CHUNKS_ATTRIBUTE = "dasknmf.chunks"


class MatrixPathError(FileNotFoundError, ValueError):
    """A path that should hold a matrix does not exist (both a FileNotFoundError and a
    ValueError, so either ``except`` clause catches it)."""


class CorruptStoreError(ValueError):
    """A stored chunk cannot be read back: corrupt, truncated or missing."""


class StorageError(ValueError):
    """A location that cannot be used: an unknown URL scheme, a missing package for it, a
    bucket that does not exist, missing credentials."""


class StoreNotSharedError(ValueError):
    """A worker does not see the store (or folder) the driver sees at the same path."""


def is_url(path) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _check_protocol(url: str) -> None:
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise StorageError(
            f"Unknown URL scheme {protocol + '://'!r} in {url}: give a local path or a URL "
            "fsspec knows (s3://, gs://, abfs://, ...)."
        ) from None
    except ImportError as error:
        raise StorageError(f"{url} needs a package that is not installed: {error}") from None


@dataclass(frozen=True)
class Location:
    """An absolute local path or a URL, and the fsspec ``storage_options`` that reach it."""

    url: str
    storage_options: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def remote(self) -> bool:
        return is_url(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.url.rstrip("/").rsplit("/", 1)[0], self.storage_options)

    @property
    def path(self) -> pathlib.Path:
        """The local path (only for a local location)."""
        if self.remote:
            raise ValueError(f"{self.url} is not a local path.")
        return pathlib.Path(self.url)

    def child(self, name: str) -> Location:
        return Location(f"{self.url.rstrip('/')}/{name}", self.storage_options)

    def sibling(self, name: str) -> Location:
        return self.parent.child(name)

    def __str__(self) -> str:
        return self.url

    # ---- file system ---------------------------------------------------------------------

    def filesystem(self):
        """``(fsspec filesystem, path within it)``."""
        import fsspec

        if not self.remote:
            return fsspec.filesystem("file"), self.url
        try:
            return fsspec.core.url_to_fs(self.url, **dict(self.storage_options or {}))
        except ImportError as error:
            raise StorageError(
                f"{self.url} needs a package that is not installed: {error}"
            ) from None

    def store(self, read_only: bool = False):
        """A Zarr store rooted here."""
        if not self.remote:
            return zarr.storage.LocalStore(self.url, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url, storage_options=dict(self.storage_options or {}), read_only=read_only
        )

    def exists(self) -> bool:
        """Whether anything is stored here (a file, a folder or objects under the prefix)."""
        if not self.remote:
            return self.path.exists()
        with remote_errors(self):
            fs, path = self.filesystem()
            fs.invalidate_cache(path)  # another process may have written or removed it
            return bool(fs.exists(path))

    def container_exists(self) -> bool:
        """Whether this location can be written: its folder (locally) or its bucket exists."""
        if not self.remote:
            return self.path.parent.is_dir()
        with remote_errors(self):
            fs, path = self.filesystem()
            bucket = path.split("/", 1)[0]
            return bool(fs.exists(bucket))

    def read_text(self) -> str:
        fs, path = self.filesystem()
        with fs.open(path, "r") as f:
            return f.read()

    def write_text(self, text: str) -> None:
        """Write a small file, durably where that is possible."""
        if not self.remote:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            return
        fs, path = self.filesystem()
        with fs.open(path, "w") as f:
            f.write(text)

    def listdir(self) -> list[str]:
        """The names directly under this folder (empty when there is none)."""
        if not self.remote:
            return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        fs, path = self.filesystem()
        try:
            entries = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def makedirs(self) -> None:
        if not self.remote:
            self.path.mkdir(parents=True, exist_ok=True)
        # an object store has no folders: a prefix exists once something is written under it

    def remove(self) -> None:
        """Remove what is here, if anything."""
        if not self.remote:
            if self.path.is_dir():
                shutil.rmtree(self.path, ignore_errors=True)
            elif self.path.exists():
                self.path.unlink()
            return
        fs, path = self.filesystem()
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
        fs.invalidate_cache(path)

    def replace(self, target: Location) -> None:
        """Move this (complete) store or file to ``target``, replacing what is there. Locally
        a rename; on an object store a server-side copy with the root metadata last (see the
        module's docstring), then this prefix is removed."""
        if not self.remote:
            if target.path.exists():
                old = target.sibling(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
                target.path.rename(old.path)
                self.path.rename(target.path)
                old.remove()
            else:
                self.path.rename(target.path)
            return
        fs, source = self.filesystem()
        _, destination = target.filesystem()
        target.remove()
        if not fs.isdir(source):
            fs.copy(source, destination)
        else:
            keys = sorted(fs.find(source))
            relative = [key[len(source.rstrip("/")) + 1 :] for key in keys]
            last = [(k, r) for k, r in zip(keys, relative, strict=True) if r == ROOT_METADATA]
            rest = [(k, r) for k, r in zip(keys, relative, strict=True) if r != ROOT_METADATA]
            for group in (rest, last):
                if group:
                    fs.copy([k for k, _ in group], [f"{destination}/{r}" for _, r in group])
        fs.invalidate_cache(destination)
        self.remove()


def location(path, storage_options: Mapping[str, Any] | None = None) -> Location:
    """``path`` (a str, an os.PathLike, a ``file://`` URL, a URL or a ``Location``) as a
    ``Location``: a local path made absolute here, once, so that every worker reads the same
    place; a URL checked for a protocol fsspec knows."""
    if isinstance(path, Location):
        if storage_options is not None and path.storage_options is None:
            return Location(path.url, storage_options)
        return path
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"Expected a path or a URL, got {type(path).__name__}.")
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if is_url(text):
        _check_protocol(text)
        return Location(text.rstrip("/"), storage_options)
    return Location(os.path.abspath(os.path.expanduser(text)), None)


@contextlib.contextmanager
def remote_errors(where: Location) -> Iterator[None]:
    """Errors of an object store (no such bucket, no credentials, access denied) as a
    ``StorageError`` that names the location; FileNotFoundError passes (the caller says what
    is missing)."""
    try:
        yield
    except (FileNotFoundError, StorageError, StoreNotSharedError):
        raise
    except zarr.errors.BaseZarrError:
        raise
    except Exception as error:
        if not where.remote:
            raise
        text = " ".join(str(error).split()) or type(error).__name__
        if "credential" in text.lower() or type(error).__name__ == "NoCredentialsError":
            text += " (configure credentials: storage_options, environment variables or files)"
        raise StorageError(f"Cannot use {where}: {type(error).__name__}: {text}") from error


# ---- what a worker opens ---------------------------------------------------------------------


def _metadata(node) -> dict:
    # A group opened through consolidated metadata carries a copy of its members' metadata,
    # one opened by path does not: compare the members themselves.
    metadata = node.metadata.to_dict()
    metadata.pop("consolidated_metadata", None)
    return metadata


def fingerprint(node) -> str:
    """A digest of a Zarr node's metadata: shape, chunks, data type, codecs, attributes — and,
    for a group (a CSR matrix), of each of its arrays."""
    parts = [_metadata(node)]
    if isinstance(node, zarr.Group):
        parts += [(name, _metadata(child)) for name, child in sorted(node.arrays())]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _where_am_i() -> str:
    try:
        from distributed import get_worker

        return f"worker {get_worker().address}"
    except (ImportError, ValueError):
        return f"process {os.getpid()} on {socket.gethostname()}"


#: (store, path, digest) of the nodes this process has checked.
_VERIFIED: set[tuple[str, str, str]] = set()


def verify(node, digest: str, where: str) -> None:
    """Check, once per process, that ``node`` (as pickled from the driver) is there, in this
    process's view of its store, with the metadata the driver saw; raise a
    ``StoreNotSharedError`` naming this worker and the store otherwise."""
    store = node.store_path.store
    key = (str(store), node.path, digest)
    if key in _VERIFIED:
        return
    try:
        fresh = zarr.open(store=store, path=node.path, mode="r")
        found = fingerprint(fresh)
        problem = None if found == digest else "holds a store whose metadata differ"
    except (FileNotFoundError, zarr.errors.BaseZarrError, KeyError):
        problem = "does not see it"
    if problem is not None:
        raise StoreNotSharedError(
            f"{_where_am_i()} {problem} at {where}, which the driver opened. Every worker "
            "must read the same store at the same path: put it on a file system that all "
            "of them mount at that path, or in an object store (s3://, gs://, abfs://)."
        )
    _VERIFIED.add(key)


# ---- chunks ------------------------------------------------------------------------------


def stored_chunks(array: zarr.Array) -> tuple[int, ...]:
    """The shape of what an array stores as one object (a file): its shards when sharded
    (each of inner chunks), else its chunks."""
    return array.shards or array.chunks


def chunk_count(shape, chunks) -> int:
    count = 1
    for size, chunk in zip(shape, chunks, strict=True):
        count *= -(-size // chunk) if size else 0
    return count


def compressors() -> list:
    """The codecs of every array dasknmf writes: blosc-lz4, which decompresses at about disk
    speed (zstd read 3× slower here, and X is read in every iteration), then a CRC32C checksum
    of the compressed chunk. Blosc keeps no checksum and decodes a truncated chunk by reading
    past its end: garbage, or an error, by chance. With the checksum a truncated or
    overwritten chunk is always an error (and checking it cost no measurable read time)."""
    return [
        zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
        zarr.codecs.Crc32cCodec(),
    ]


def complete_chunks_config() -> dict:
    """The Zarr array config for arrays dasknmf writes: every chunk is stored, also one that
    holds only the fill value, so that a chunk missing later can be told from data."""
    return {"write_empty_chunks": True}


def missing_chunks(array: zarr.Array, region: tuple[slice, ...]) -> list[str]:
    """The keys of the stored chunks under ``region`` that are not in the store, for an array
    written by dasknmf (attribute ``dasknmf.chunks``); [] for any other array, whose missing
    chunks cannot be told from chunks of fill values."""
    if CHUNKS_ATTRIBUTE not in array.attrs:
        return []
    import itertools

    from zarr.core.sync import sync

    grid = stored_chunks(array)
    ranges = []
    for part, size, chunk in zip(region, array.shape, grid, strict=True):
        start, stop, _ = part.indices(size)
        if stop <= start:
            return []
        ranges.append(range(start // chunk, (stop - 1) // chunk + 1))
    prefix = f"{array.path}/" if array.path else ""
    keys = [prefix + array.metadata.encode_chunk_key(c) for c in itertools.product(*ranges)]
    store = array.store_path.store

    async def look() -> list[bool]:
        import asyncio

        return await asyncio.gather(*(store.exists(key) for key in keys))

    return [key for key, there in zip(keys, sync(look()), strict=True) if not there]


# ---- outputs -------------------------------------------------------------------------------


def check_output(target: Location, overwrite: bool, how: str = "overwrite=True") -> None:
    """Refuse to write ``target`` when something is there (unless ``overwrite``; ``how`` says
    how to ask for that) or when its folder (its bucket) does not exist."""
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass {how} to replace it.")
    if not target.container_exists():
        where = (
            f"its bucket {target.url.split('://', 1)[1].split('/', 1)[0]}"
            if target.remote
            else (f"its folder {target.parent}")
        )
        raise MatrixPathError(f"Cannot write {target}: {where} does not exist.")


@contextlib.contextmanager
def atomic(target: Location, overwrite: bool = False) -> Iterator[Location]:
    """Yield a temporary sibling of ``target`` to write into; move it into place on success
    (``Location.replace``), remove it on failure."""
    check_output(target, overwrite)
    tmp = target.sibling(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.remove()


def distributed_client():
    """The distributed Client that dask's default scheduler runs on, or None."""
    import dask

    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return None
    scheduler = dask.base.get_scheduler()
    return client if getattr(scheduler, "__self__", None) is client else None


def probe_workers(node) -> None:
    """Before the workers of the current distributed cluster (if any) write into ``node``'s
    store (a new array or group this process created): check they share it
    (``probe_shared``)."""
    client = distributed_client()
    if client is not None:
        probe_shared(client, node.store_path.store, node.store_path.path, str(node.store_path))


def _run(coroutine):
    from zarr.core.sync import sync

    return sync(coroutine)


def _key(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def probe_shared(client, store, prefix: str = "", where: str | None = None) -> None:
    """Check that every worker of ``client`` reads and writes the Zarr ``store`` (at
    ``prefix``) as this process does: each finds the probe this process wrote there, and
    writes one that this process then finds. Raises ``StoreNotSharedError`` naming the
    workers that do not share it, before they write anything there that would be lost."""
    from zarr.core.buffer import default_buffer_prototype

    token = f".dasknmf-probe-{uuid.uuid4().hex[:12]}"
    prototype = default_buffer_prototype()
    _run(store.set(_key(prefix, token), prototype.buffer.from_bytes(token.encode())))
    answers: dict[str, str | None] = {}
    try:
        answers = client.run(_probe_on_worker, store, prefix, token)
        not_shared = []
        for worker, theirs in sorted(answers.items()):
            found = theirs and _run(store.get(theirs, prototype=prototype))
            if not found or found.to_bytes() != worker.encode():
                not_shared.append(worker)
        if not_shared:
            raise StoreNotSharedError(
                f"worker {', '.join(not_shared)} does not share {where or store} with the "
                "driver (a probe written on one side is not seen on the other), and workers "
                "write blocks of W and checkpoints there: give every worker the same folder at "
                "the same path (a shared file system), or use an object store (s3://, gs://, "
                "abfs://)."
            )
    finally:
        for theirs in answers.values():
            if theirs:
                _run(store.delete(theirs))
        _run(store.delete(_key(prefix, token)))


def _probe_on_worker(store, prefix: str, token: str, dask_worker=None) -> str | None:
    """On a worker: if it finds the driver's probe, write one of its own (holding its address)
    and return its key; else None (nothing is written into a folder of the worker's own)."""
    from zarr.core.buffer import default_buffer_prototype

    prototype = default_buffer_prototype()
    try:
        found = _run(store.get(_key(prefix, token), prototype=prototype))
    except OSError:
        found = None
    if found is None or found.to_bytes() != token.encode():
        return None
    address = dask_worker.address if dask_worker is not None else _where_am_i()
    theirs = _key(prefix, f"{token}-{uuid.uuid4().hex[:8]}")
    try:
        _run(store.set(theirs, prototype.buffer.from_bytes(address.encode())))
    except OSError:
        return None
    return theirs
