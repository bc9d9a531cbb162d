"""A local fake of a `gs://` bucket for tests: an fsspec filesystem registered for the `gs`
protocol whose objects are files under a local folder (`gs://bucket/x` -> ROOT/bucket/x).

It is an fsspec `LocalFileSystem`, so epath (which rlhf_jax uses for bucket outputs) reads
and writes it through fsspec exactly as it would gcsfs, and `storage.orbax_directory` hands
orbax the local folder (orbax's tensorstore would otherwise talk to the real GCS).
"""

from __future__ import annotations

from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path


class FakeBucket(LocalFileSystem):
    protocol = ("gs", "gcs")
    root = ""  # set by the `fake_bucket` fixture

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes this for gs
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return f"{cls.root}/{path[len(prefix) :]}".rstrip("/")
        return super()._strip_protocol(path)  # already a local path (fsspec's own calls)


def install(root: str) -> None:
    import fsspec

    FakeBucket.root = root
    fsspec.register_implementation("gs", FakeBucket, clobber=True)
    fsspec.register_implementation("gcs", FakeBucket, clobber=True)


def uninstall() -> None:
    from etils.epath import backend
    from fsspec.registry import _registry

    for name in ("gs", "gcs"):
        _registry.pop(name, None)
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath keeps filesystems it made


if __name__ == "__main__":
    # `python tests/fake_bucket.py ARGS...`: `rlhf-jax ARGS...` with gs:// served from
    # $FAKE_BUCKET_ROOT, for tests that run the CLI in subprocesses (several JAX processes).
    import os
    import sys

    install(os.environ["FAKE_BUCKET_ROOT"])
    from rlhf_jax.cli import console

    sys.argv = ["rlhf-jax", *sys.argv[1:]]
    console()
