"""Parity of `rlhf_jax.models` with transformers' PyTorch models on tiny random checkpoints.

Tolerance ("1e-4 relative"): logits are compared relative to the *scale of the logits*, not
element by element. An element-wise relative tolerance is meaningless for logits near zero
(a logit of 1e-7 would have to match to 1e-11), so each element must satisfy

    |ours - ref| <= 1e-4 * max|ref| + 1e-4 * |ref|

(`assert_allclose(rtol=1e-4, atol=1e-4 * max|ref|)`). For these float32 models (|logits| up
to ~6) that allows ~6e-4 per element, while the differences seen from a different summation
order are ~1e-6, and a real mistake (a wrong RoPE frequency, a dropped bias, a swapped
head layout) moves the logits by 1e-2 or more.
"""

import json
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from hf_fixtures import FAMILIES, ROPE_FAMILIES, VOCAB, llama3_inverse_frequencies, torch_logits
from safetensors.numpy import load_file, save_file

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.models import ModelConfig, forward, load_hf, save_hf


@pytest.fixture(autouse=True)
def _no_torch_grad():
    """PyTorch here is a reference only: no autograd, restored after each test (a module-level
    `torch.set_grad_enabled(False)` leaked into later tests in the same worker)."""
    with torch.no_grad():
        yield


REL = 1e-4
B, T = 3, 12

# `forward` under jit (config is a frozen, hashable dataclass): one compile per shape is several
# times faster on CPU than op-by-op dispatch, and numerically it is the same function.
jit_forward = jax.jit(forward, static_argnums=0)


def assert_logits_close(ours, ref, rel=REL, where=None):
    """Element-wise |ours - ref| <= rel * max|ref| + rel * |ref| (see the module docstring)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.all(np.isfinite(ours)), "non-finite logits"
    scale = float(np.max(np.abs(ref)))
    assert scale > 0.5, f"reference logits suspiciously small (max |logit| = {scale})"
    np.testing.assert_allclose(ours, ref, rtol=rel, atol=rel * scale, err_msg=where or "")


def random_ids(seed=0, shape=(B, T)):
    return np.random.RandomState(seed).randint(0, VOCAB, size=shape).astype(np.int32)


def jax_logits(config, params, ids, mask=None):
    if mask is None:
        mask = np.ones(ids.shape, np.int32)
    out = jit_forward(config, params, ids, mask)
    assert out.shape == (*ids.shape, config.vocab_size)
    assert out.dtype == np.float32
    return np.asarray(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, hf_checkpoint, hf_torch_model):
    path = hf_checkpoint(family)
    config, params = load_hf(path, dtype="float32")
    assert isinstance(config, ModelConfig)
    assert config.model_type == family
    assert config.vocab_size == VOCAB
    for leaf in jax.tree.leaves(params):
        assert isinstance(leaf, jax.Array) and leaf.dtype == np.float32
    ids = random_ids(0)
    ref = torch_logits(hf_torch_model(path), ids)
    assert_logits_close(jax_logits(config, params, ids), ref, where=family)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_rows_equal_unpadded(family, hf_checkpoint, hf_torch_model):
    """Each left-padded row gives, at its real positions, the logits of the row alone."""
    path = hf_checkpoint(family)
    config, params = load_hf(path)
    model = hf_torch_model(path)
    lengths = [T, 8, 3]
    ids = random_ids(1)
    mask = np.zeros((B, T), np.int32)
    for r, n in enumerate(lengths):
        mask[r, T - n :] = 1
        ids[r, : T - n] = 0  # pad id; the value under the mask must not matter anyway
    padded = jax_logits(config, params, ids, mask)
    for r, n in enumerate(lengths):
        alone_ids = ids[r : r + 1, T - n :]
        alone = jax_logits(config, params, alone_ids)
        assert_logits_close(padded[r : r + 1, T - n :], alone, where=f"{family} row {r}")
        assert_logits_close(
            padded[r : r + 1, T - n :], torch_logits(model, alone_ids), where=f"{family} row {r}"
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_positions_are_finite(family, hf_checkpoint):
    """Logits at padding positions are never used, but must not be NaN/inf: a NaN times a
    zero mask is still NaN and would poison any masked loss or gradient."""
    config, params = load_hf(hf_checkpoint(family))
    ids = random_ids(2)
    mask = np.ones((B, T), np.int32)
    mask[1, :5] = 0
    mask[2, : T - 1] = 0
    assert np.all(np.isfinite(jax_logits(config, params, ids, mask)))


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_loads_equal(family, hf_checkpoint, hf_torch_model):
    sharded = hf_checkpoint(family, "sharded")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    config_s, params_s = load_hf(sharded)
    config_p, params_p = load_hf(hf_checkpoint(family))
    assert config_s == config_p
    jax.tree.map(np.testing.assert_array_equal, params_s, params_p)
    ids = random_ids(3)
    ref = torch_logits(hf_torch_model(sharded), ids)
    assert_logits_close(jax_logits(config_s, params_s, ids), ref, where=family)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_old_style_rope_config_loads_equal(family, hf_checkpoint, hf_torch_model):
    """transformers 4.x configs: top-level `rope_theta` and `rope_scaling` (dict or null)."""
    old = hf_checkpoint(family, "old_rope")
    raw = json.loads((old / "config.json").read_text())
    assert "rope_parameters" not in raw and "rope_theta" in raw and "rope_scaling" in raw
    config_old, params_old = load_hf(old)
    config_new, _ = load_hf(hf_checkpoint(family))
    assert config_old == config_new
    ids = random_ids(4)
    ref = torch_logits(hf_torch_model(old), ids)
    assert_logits_close(jax_logits(config_old, params_old, ids), ref, where=family)


def test_fixture_llama3_scaling_covers_all_three_regimes(hf_checkpoint, hf_torch_model):
    """Guards the fixture: transformers' llama3 frequencies are the reference ones and the
    scaling keeps one frequency, interpolates one and divides the others by the factor."""
    model = hf_torch_model(hf_checkpoint("llama"))
    base, scaled = llama3_inverse_frequencies(head_dim=16)
    np.testing.assert_allclose(model.model.rotary_emb.inv_freq.numpy(), scaled, rtol=1e-5)
    ratio = base / scaled
    assert np.isclose(ratio[0], 1.0)
    assert 1.0 < ratio[1] < 8.0
    np.testing.assert_allclose(ratio[2:], 8.0)


def test_llama3_rope_scaling_matters(hf_checkpoint, hf_torch_model):
    """Without the llama3 frequency scaling the logits are clearly different, so the parity
    test above really checks the scaling (positions up to T-1 = 11 are enough)."""
    path = hf_checkpoint("llama")
    config, params = load_hf(path)
    assert config.rope_scaling is not None
    unscaled = config.replace(rope_scaling=None)
    ids = random_ids(5)
    ref = torch_logits(hf_torch_model(path), ids)
    diff = np.max(np.abs(jax_logits(unscaled, params, ids) - ref))
    assert diff > 100 * REL * np.max(np.abs(ref))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_round_trip_through_transformers(family, hf_checkpoint, hf_torch_model, tmp_path):
    """save_hf writes a folder transformers loads with every weight identical."""
    from hf_fixtures import load_hf_torch

    path = hf_checkpoint(family)
    original = hf_torch_model(path)
    config, params = load_hf(path)
    out = save_hf(config, params, tmp_path / "saved")
    out = Path(out) if out is not None else tmp_path / "saved"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    reloaded = load_hf_torch(out)
    assert type(reloaded) is type(original)
    # Every weight transformers uses (including ones it would silently re-initialise if the
    # file lacked them) is bit-identical to the original's.
    want, got = original.state_dict(), reloaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    ids = random_ids(6)
    np.testing.assert_allclose(
        torch_logits(reloaded, ids), torch_logits(original, ids), rtol=0, atol=1e-6
    )
    # And it reads back into the same config and params.
    config_back, params_back = load_hf(out)
    assert config_back == config
    jax.tree.map(np.testing.assert_array_equal, params_back, params)


def test_gpt2_checkpoint_without_transformer_prefix(hf_checkpoint, hf_torch_model, tmp_path):
    """The original GPT-2 files name tensors `h.0.attn...` (no `transformer.` prefix) and carry
    the causal-mask buffers `h.{i}.attn.bias`; transformers loads those, so should we."""
    src = hf_checkpoint("gpt2")
    tensors = load_file(str(src / "model.safetensors"))
    assert all(k.startswith("transformer.") for k in tensors), sorted(tensors)[:3]
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    n_pos = json.loads((src / "config.json").read_text())["n_positions"]
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = np.tril(np.ones((n_pos, n_pos), np.float32))[None, None]
    dst = tmp_path / "gpt2-legacy"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(legacy, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config, params = load_hf(dst)
    ids = random_ids(7)
    assert_logits_close(jax_logits(config, params, ids), torch_logits(hf_torch_model(src), ids))


@pytest.mark.parametrize("model_type", ["bert", "mamba"])
def test_unsupported_model_type_is_refused(model_type, hf_checkpoint, tmp_path):
    folder = tmp_path / model_type
    folder.mkdir()
    raw = json.loads((hf_checkpoint("llama") / "config.json").read_text())
    raw["model_type"] = model_type
    raw["architectures"] = ["SomethingForCausalLM"]
    (folder / "config.json").write_text(json.dumps(raw))
    shutil.copy(hf_checkpoint("llama") / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(RlhfJaxError, match=model_type):
        load_hf(folder)


def test_an_unsupported_rope_type_names_the_file(hf_checkpoint, tmp_path):
    folder = tmp_path / "yarn"
    shutil.copytree(hf_checkpoint("llama"), folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(RlhfJaxError, match=r"config.json: model_type 'llama': rope type 'yarn'"):
        load_hf(folder)


class _Tripwire:
    """Unpickling this object creates `marker`: proof that a pickle file was opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_checkpoint_is_refused_without_unpickling(hf_checkpoint, tmp_path):
    folder = tmp_path / "pickle-only"
    folder.mkdir()
    shutil.copy(hf_checkpoint("llama") / "config.json", folder / "config.json")
    marker = tmp_path / "UNPICKLED"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Tripwire(marker)}, f)
    with pytest.raises(RlhfJaxError, match="safetensors"):
        load_hf(folder)
    assert not marker.exists(), "load_hf unpickled pytorch_model.bin"


def test_real_torch_pickle_only_checkpoint_is_refused(hf_checkpoint, hf_torch_model, tmp_path):
    path = hf_checkpoint("gpt2")
    folder = tmp_path / "torch-bin"
    folder.mkdir()
    shutil.copy(path / "config.json", folder / "config.json")
    torch.save(hf_torch_model(path).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(RlhfJaxError, match="safetensors"):
        load_hf(folder)
