"""Storage by URI: every path a run reads or writes is a local path or a URI (``s3://``, ``gs://``,
``file://``, or any fsspec protocol), opened where it is needed.

- ``as_path(x)``: a local path stays a ``pathlib.Path`` (nothing about local runs changes); a URI
  becomes a :class:`RemotePath`, the part of the ``pathlib`` interface the sinks use, on a
  ``pyarrow.fs`` file system (pyarrow's own S3/GCS/HDFS, else fsspec through ``FSSpecHandler``).
  S3 settings come from the usual environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...)
  or from URI query options (``s3://b/k?endpoint_override=...``).
- ``publish_atomic(final, write)``: write to a hidden temp name beside ``final``, then publish it by
  rename (local: ``os.replace``; object stores: a server-side copy, whose result appears whole,
  then the temp key is deleted). A reader of ``data/train-*`` never sees half a file.
- ``local_dir(x)``: a read-only input folder (model, index, segmenter, source tree) as a local
  folder: a local path as it is, a URI mirrored once per node into ``AMGEN_CACHE_DIR``
  (default ``/tmp/amgen-cache``) under a name derived from the URI and its listing (names, sizes,
  times), so a changed folder gets a new mirror and every node picks the same name;
  ``relocate`` moves a path listed in one node's mirror into another's.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import urlsplit

import pyarrow.fs as pafs

CACHE_ENV = "AMGEN_CACHE_DIR"
DEFAULT_CACHE = "/tmp/amgen-cache"
_MIRROR_DONE = ".amgen-mirror-complete"


class StorageError(OSError):
    """A location that cannot be opened, or a file that is not where it should be."""


def is_uri(location: str | os.PathLike) -> bool:
    s = str(location)
    return "://" in s and not s.startswith("file://")


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, NotImplementedError) as first:  # ArrowInvalid is a ValueError
        try:  # pyarrow does not know the scheme: fsspec may (e.g. gcsfs, adlfs, memory)
            import fsspec
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            fs, path = fsspec.core.url_to_fs(uri)
            return PyFileSystem(FSSpecHandler(fs)), path
        except (ImportError, ValueError) as second:
            raise StorageError(f"{uri}: cannot open this location ({first}; fsspec: {second})") from second


@dataclass(frozen=True)
class _Stat:
    st_size: int


class RemotePath:
    """A file or folder on a ``pyarrow.fs`` file system, with the pathlib calls the sinks use.

    No ``__fspath__``: handing one to ``open()`` or ``os`` fails loudly instead of creating a local
    file named like a URI."""

    def __init__(self, fs: pafs.FileSystem, path: str, prefix: str):
        self.fs, self.path, self.prefix = fs, path.rstrip("/"), prefix

    @classmethod
    def from_uri(cls, uri: str) -> "RemotePath":
        fs, path = _filesystem(uri)
        parts = urlsplit(uri)
        return cls(fs, path, f"{parts.scheme}://")

    # -- names
    def __str__(self) -> str:
        return f"{self.prefix}{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str | os.PathLike) -> "RemotePath":
        return RemotePath(self.fs, posixpath.join(self.path, str(name)), self.prefix)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.fs, posixpath.dirname(self.path), self.prefix)

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def relative_to(self, other: "RemotePath") -> PurePosixPath:
        return PurePosixPath(self.path).relative_to(other.path)

    # -- queries
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> _Stat:
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self}: no such file")
        return _Stat(int(info.size))

    def iterdir(self) -> list["RemotePath"]:
        if not self.is_dir():
            raise FileNotFoundError(f"{self}: no such folder")
        sel = pafs.FileSelector(self.path, recursive=False)
        return [RemotePath(self.fs, i.path, self.prefix) for i in self.fs.get_file_info(sel)]

    def glob(self, pattern: str) -> list["RemotePath"]:
        """Children matching one fnmatch pattern (no ``**``); empty when the folder is missing."""
        if "/" in pattern:
            head, rest = pattern.split("/", 1)
            return [q for d in self.glob(head) if d.is_dir() for q in d.glob(rest)]
        if not self.is_dir():
            return []
        return sorted((p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)), key=str)

    # -- bytes
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self}: no such file") from e

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        self.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        return len(data)

    def open_input(self):
        return self.fs.open_input_file(self.path)

    # -- changes
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.create_dir(self.path, recursive=True)  # object stores: a no-op or a marker

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        self.fs.delete_dir(self.path)

    def replace(self, target: "RemotePath") -> "RemotePath":
        if target.prefix != self.prefix:
            raise StorageError(f"cannot move {self} to {target}: another file system")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.fs.move(self.path, target.path)  # S3: copy (appears whole) + delete
        return target


def as_path(location: str | os.PathLike | RemotePath) -> Path | RemotePath:
    """A local path (``file://`` included) as a Path, a URI as a RemotePath."""
    if isinstance(location, (Path, RemotePath)):
        return location
    s = os.fspath(location) if not isinstance(location, str) else location
    if s.startswith("file://"):
        return Path(urlsplit(s).path)
    if is_uri(s):
        return RemotePath.from_uri(s)
    return Path(s)


def location_str(location: str | os.PathLike | RemotePath) -> str:
    """What a worker needs to open ``location`` again: an absolute local path or the URI."""
    p = as_path(location)
    return str(p) if isinstance(p, RemotePath) else str(Path(p).absolute())


def arrow_target(p: Path | RemotePath) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) for pyarrow readers and writers."""
    if isinstance(p, RemotePath):
        return p.path, p.fs
    return str(p), None


def file_sha256(p: str | os.PathLike | RemotePath) -> str:
    p = as_path(p)
    h = hashlib.sha256()
    with (p.fs.open_input_stream(p.path) if isinstance(p, RemotePath) else open(p, "rb")) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def temp_name(final: Path | RemotePath) -> Path | RemotePath:
    """A hidden name beside ``final`` (the ``data/train-*`` glob and shard listings skip dot names)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns() % 10**9}")


def publish_atomic(final: Path | RemotePath, write: Callable[[Path | RemotePath], None]) -> Path | RemotePath:
    """``write(tmp)`` fills a temp file beside ``final``; then it is published as ``final`` in one
    step. A failure leaves no temp file and no (new) ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        write(tmp)
        if isinstance(final, RemotePath):
            tmp.replace(final)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def write_bytes_atomic(final: str | os.PathLike | RemotePath, data: bytes) -> Path | RemotePath:
    """Whole bytes under ``final``, published atomically (local or remote)."""
    final = as_path(final)
    if isinstance(final, RemotePath):
        return publish_atomic(final, lambda tmp: tmp.write_bytes(data))
    from amgen_core.image_io import write_bytes_atomic as local_write

    return local_write(final, data)


def rmtree(p: Path | RemotePath) -> None:
    if isinstance(p, RemotePath):
        p.rmtree()
    else:
        shutil.rmtree(p)


# ---------------------------------------------------------------- read-only inputs on every node

def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def mirror_name(uri: str, listing: str = "") -> str:
    """Where a URI's local mirror lives under the cache root, ``DIGEST/NAME``: the same on every
    node (the digest covers the URI and what is stored there, so a rebuilt folder gets a new
    mirror), and the folder keeps its own name (a model's name is its folder's).
    ``relocate`` finds it in paths."""
    digest = hashlib.sha256(f"{uri.rstrip('/')}\n{listing}".encode()).hexdigest()[:16]
    tail = posixpath.basename(urlsplit(uri).path.rstrip("/")) or "root"
    return f"{digest}/{tail}"


def _listing(p: RemotePath) -> tuple[str, list[pafs.FileInfo]]:
    files = sorted((i for i in p.fs.get_file_info(pafs.FileSelector(p.path, recursive=True))
                    if i.type == pafs.FileType.File), key=lambda i: i.path)
    text = "\n".join(f"{i.path}\t{i.size}\t{i.mtime_ns}" for i in files)
    return text, files


def relocate(path: str, local_root: str) -> str:
    """A path inside some node's mirror of a folder, moved into ``local_root`` (this node's mirror
    of the same folder): item descriptors listed on one node are read on another."""
    name = "/" + "/".join(Path(local_root).parts[-2:]) + "/"
    i = path.find(name)
    return path if i < 0 else local_root + "/" + path[i + len(name):]


def local_dir(location: str | os.PathLike | None) -> str | None:
    """A read-only input folder as a local folder path (mirrored once per node for a URI)."""
    if location is None:
        return None
    p = as_path(location)
    if not isinstance(p, RemotePath):
        return str(p)
    return _mirror(str(p))


@lru_cache(maxsize=64)
def _mirror(uri: str) -> str:
    p = as_path(uri)
    if not p.is_dir():
        raise StorageError(f"{p}: no such folder (needed as a read-only input)")
    listing, files = _listing(p)
    dest = cache_root() / mirror_name(uri, listing)
    if (dest / _MIRROR_DONE).is_file():
        return str(dest)
    import fcntl

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node, whichever process comes first
        if not (dest / _MIRROR_DONE).is_file():
            part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
            if part.exists():
                shutil.rmtree(part)
            for info in files:
                rel = PurePosixPath(info.path).relative_to(p.path)
                target = part / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with p.fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            part.mkdir(parents=True, exist_ok=True)
            (part / _MIRROR_DONE).write_text(str(p) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(part, dest)
    return str(dest)


def upload_dir(local: str | os.PathLike, dest: str | os.PathLike | RemotePath) -> None:
    """Copy a finished local folder to ``dest`` (a URI or a local path), file by file."""
    src, target = Path(local), as_path(dest)
    if not isinstance(target, RemotePath):
        if Path(target).resolve() != src.resolve():
            shutil.copytree(src, target, dirs_exist_ok=True)
        return
    for f in sorted(src.rglob("*")):
        if f.is_file():
            (target / f.relative_to(src).as_posix()).write_bytes(f.read_bytes())
