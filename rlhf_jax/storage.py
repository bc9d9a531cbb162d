"""Where a run reads and writes: local paths or URLs, through this one small layer.

- A local path stays a `pathlib.Path`: local runs behave exactly as before.
- `file:///abs/path` is that local path (so nothing ever makes a folder named `file:`).
- `gs://`, `s3://` (and, for inputs, any scheme fsspec knows, e.g. `memory://`) go through
  fsspec; outputs are `etils.epath.Path` objects, the path type orbax itself uses, so the run
  writes metrics, reports and checkpoints straight to the bucket.
- Inputs at a URL (model folders, data files, reward models) are downloaded once to a local
  cache folder (`$RLHF_JAX_CACHE`, default `~/.cache/rlhf_jax/downloads`), re-fetched when the
  remote files change: transformers and safetensors read local files only.
- Models saved to a URL are written to a local temporary folder, then uploaded.

A scheme whose fsspec filesystem is not installed is a `StorageError` (one line, exit 2)
raised by `check_location` before anything trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_jax.errors import RlhfJaxError

# What orbax (tensorstore) can write checkpoints to, besides local folders.
OUTPUT_SCHEMES = ("gs", "s3")
# The fsspec package each common scheme needs, for the error message.
_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(RlhfJaxError):
    """A URL this installation cannot read or write."""


def url_scheme(location: Any) -> str | None:
    """`gs` for `gs://bucket/x`; None for a local path (a `Path`, or a string without `://`)."""
    if isinstance(location, Path):
        return None
    m = _URL.match(os.fspath(location))
    return m.group(1).lower() if m else None


def is_url(location: Any) -> bool:
    """Whether `location` names something that is not a local path (`file://` excepted)."""
    return url_scheme(location) not in (None, "file")


def _file_url_path(text: str, what: str) -> Path:
    rest = text[len("file://") :]
    if not rest.startswith("/"):  # file://host/path: another machine's disk
        raise StorageError(f"{what} {text}: a file:// URL must name an absolute local path")
    return Path(rest)


def _filesystem_class(scheme: str, text: str, what: str) -> type:
    import fsspec

    try:
        return fsspec.get_filesystem_class(scheme)
    except ImportError:
        package = _PACKAGES.get(scheme, f"the fsspec filesystem for {scheme}://")
        raise StorageError(
            f"{what} {text}: {scheme}:// needs {package}, which is not installed "
            f"(pip install {package})"
        ) from None
    except ValueError:
        raise StorageError(f"{what} {text}: no filesystem is known for {scheme}://") from None


def check_location(text: str | os.PathLike, what: str, output: bool = False) -> None:
    """Raise StorageError now, before any work, if `text` cannot be used: a scheme whose
    filesystem is not installed, or an output scheme orbax cannot write checkpoints to."""
    scheme = url_scheme(text)
    if scheme is None:
        return
    text = os.fspath(text)
    if scheme == "file":
        _file_url_path(text, what)
        return
    _filesystem_class(scheme, text, what)
    if output and scheme not in OUTPUT_SCHEMES and not _is_local_fs(scheme):
        raise StorageError(
            f"{what} {text}: checkpoints cannot be written to {scheme}:// (orbax writes local "
            f"folders, file://, {', '.join(s + '://' for s in OUTPUT_SCHEMES)})"
        )


def _is_local_fs(scheme: str) -> bool:
    """A scheme fsspec serves from this machine's disk (a mounted bucket, or a test's fake)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fsspec.filesystem(scheme), LocalFileSystem)


def output_path(location: Any):
    """The run's output as a path object: `pathlib.Path` for local paths and file:// URLs,
    `epath.Path` for bucket URLs (call `check_location` first for a one-line error)."""
    if not isinstance(location, (str, os.PathLike)) or isinstance(location, Path):
        return location  # already a path object (pathlib or epath)
    text = os.fspath(location)
    scheme = url_scheme(text)
    if scheme is None:
        return Path(text)
    if scheme == "file":
        return _file_url_path(text, "path")
    from etils import epath

    return epath.Path(text)


def orbax_directory(directory: Any) -> str:
    """The checkpoint folder as orbax should be given it. orbax's tensorstore writes gs:// and
    s3:// itself; a URL whose fsspec filesystem is this machine's disk reaches it as that
    local path (tensorstore would otherwise write a local folder named like the URL)."""
    text = os.fspath(directory)
    scheme = url_scheme(text)
    if scheme is None or scheme in OUTPUT_SCHEMES and not _is_local_fs(scheme):
        return text
    import fsspec

    fs = fsspec.filesystem(scheme)
    return fs._strip_protocol(text)


def remove_tree(path: Any) -> None:
    """`shutil.rmtree` for local folders, the bucket's recursive delete for URLs."""
    if isinstance(path, Path):
        shutil.rmtree(path)
    else:
        path.rmtree()


def _fingerprint(fs, path: str) -> tuple[bool, str]:
    """(is a folder, a digest of every file's name, size and version as the store says)."""
    is_dir = fs.isdir(path)
    files = fs.find(path, detail=True) if is_dir else {path: fs.info(path)}
    keys = ("size", "mtime", "LastModified", "etag", "ETag", "md5Hash", "generation", "created")
    listing = sorted(
        (name[len(path) :], {k: str(info[k]) for k in keys if k in info})
        for name, info in files.items()
    )
    return is_dir, hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def cache_root() -> Path:
    """Where inputs at URLs are downloaded (`$RLHF_JAX_CACHE`, else ~/.cache/rlhf_jax)."""
    root = os.environ.get("RLHF_JAX_CACHE") or os.path.join("~", ".cache", "rlhf_jax")
    return Path(os.path.expanduser(root)) / "downloads"


def local_copy(location: Any, what: str = "path") -> Path:
    """A local path holding `location`: itself when local; for a URL, a copy in the cache,
    downloaded once and fetched again when the remote files change. Safe for several
    processes of one machine at once (each downloads aside and renames into place)."""
    if not isinstance(location, (str, os.PathLike)) or not is_url(location):
        if isinstance(location, (str, os.PathLike)) and url_scheme(location) == "file":
            return _file_url_path(os.fspath(location), what)
        return Path(location)
    text = os.fspath(location).rstrip("/")
    scheme = url_scheme(text)
    _filesystem_class(scheme, text, what)
    import fsspec

    fs, remote = fsspec.core.url_to_fs(text)
    if not fs.exists(remote):
        raise RlhfJaxError(f"{what} {text}: no such file or folder")
    is_dir, digest = _fingerprint(fs, remote)
    name = text.rsplit("/", 1)[-1] or "root"
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    home = cache_root() / f"{key}-{digest}"
    target = home / name
    if (home / ".complete").exists():
        return target
    cache_root().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_root()))
    try:
        if is_dir:
            fs.get(remote.rstrip("/") + "/", str(staging / name), recursive=True)
        else:
            fs.get(remote, str(staging / name))
        (staging / ".complete").write_text(text + "\n")
        try:
            os.rename(staging, home)
        except OSError:  # another process of this machine finished the same copy first
            if not (home / ".complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def writable_folder(location: Any) -> Iterator[Path]:
    """A local folder to write a model into: `location` itself when local; for a URL, a
    temporary folder uploaded to it when the block ends without error (transformers'
    tokenizers and safetensors write local files only)."""
    if not is_url(location):
        yield output_path(location)
        return
    dest = os.fspath(location).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="rlhf_jax-upload-") as tmp:
        yield Path(tmp)
        files = [p for p in Path(tmp).rglob("*") if p.is_file()]
        if files:
            import fsspec

            fs, remote = fsspec.core.url_to_fs(dest)
            fs.makedirs(remote, exist_ok=True)
            fs.put(f"{tmp}/", remote, recursive=True)
