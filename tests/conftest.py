import sys
from pathlib import Path

import pytest

# Let tests import the helper modules beside them (tiny.py, hf_fixtures.py).
sys.path.insert(0, str(Path(__file__).parent))

# Keep this file light: no jax / torch / transformers imports at module level, so that a test
# module may still set XLA flags before jax is first imported. Heavy imports happen inside
# the fixtures, the first time one is used.


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`hf_checkpoint(family, variant="plain") -> Path` of a tiny random HF checkpoint.

    Variants: "plain" (model.safetensors), "sharded" (several files + index json),
    "old_rope" (config.json in the transformers 4.x rope_theta / rope_scaling style).
    All variants of a family hold the same weights (same seed). Each checkpoint is built once
    per session (per xdist worker), on first use.
    """
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, variant: str = "plain") -> Path:
        key = (family, variant)
        if key not in built:
            from hf_fixtures import make_tiny_checkpoint

            if variant not in ("plain", "sharded", "old_rope"):
                raise ValueError(f"unknown checkpoint variant {variant!r}")
            path = tmp_path_factory.mktemp(f"ckpt-{family}-{variant}")
            built[key] = make_tiny_checkpoint(
                family,
                path,
                seed=0,
                sharded=variant == "sharded",
                old_rope_style=variant == "old_rope",
            )
        return built[key]

    return get


@pytest.fixture(scope="session")
def hf_torch_model():
    """`hf_torch_model(path)`: transformers' float32 eager model of a folder, cached per path."""
    loaded: dict[Path, object] = {}

    def get(path) -> object:
        path = Path(path)
        if path not in loaded:
            from hf_fixtures import load_hf_torch

            loaded[path] = load_hf_torch(path)
        return loaded[path]

    return get


@pytest.fixture(scope="session")
def bucket_root(tmp_path_factory):
    """The local folder behind the fake `gs://` (tests/fake_bucket.py), one per session."""
    return tmp_path_factory.mktemp("bucket")


@pytest.fixture
def fake_bucket(bucket_root, tmp_path, monkeypatch):
    """`gs://BUCKET/...` served from `bucket_root/BUCKET/...` for one test (yields the root);
    URL inputs are downloaded into this test's own cache folder."""
    import fake_bucket as fb

    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "url-cache"))
    fb.install(str(bucket_root))
    yield bucket_root
    fb.uninstall()
