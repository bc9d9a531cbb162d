"""Read and write Hugging Face checkpoint folders without PyTorch.

Weights are read from safetensors as NumPy, one tensor (and for stacked layers, one layer) at a
time, and placed straight onto their target devices: with `shardings`, each device's shard is
built by `jax.make_array_from_callback` from only the layers and slices it holds, so a model
larger than one host's memory loads shard by shard. Pickle files are never opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.models.config import DTYPES, ModelConfig
from rlhf_jax.models.heads import scalar_trunk
from rlhf_jax.models.hf.config_map import from_hf_config, to_hf_config
from rlhf_jax.models.hf.weights_map import Source, hf_sources, to_hf_tensors
from rlhf_jax.models.transformer import param_shapes
from rlhf_jax.storage import local_copy, output_path, writable_folder

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig of a checkpoint folder (its config.json), with clear errors."""
    folder = local_copy(path, "model folder")
    if not folder.is_dir():
        raise RlhfJaxError(f"{folder}: checkpoint folder not found")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise RlhfJaxError(f"{folder}: no config.json in the checkpoint folder")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RlhfJaxError(f"{config_file}: not valid JSON ({e})") from None
    return from_hf_config(data, source=str(config_file))


def _open(file: Path):
    """`safe_open`, with a damaged file (truncated by an interrupted download or copy, or not
    safetensors at all) reported as the file and the reason, not a SafetensorError trace."""
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise RlhfJaxError(
            f"{file}: not a readable safetensors file ({e}); it may be truncated (an "
            "interrupted download or copy): fetch it again"
        ) from None


class _TensorIndex:
    """Maps tensor names to the safetensors file holding them; opens files lazily."""

    def __init__(self, folder: Path):
        index_file = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            self.file_of = {name: folder / f for name, f in weight_map.items()}
        elif single.is_file():
            with _open(single) as f:
                self.file_of = {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        else:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise RlhfJaxError(
                    f"{folder}: only pickle weights found ({', '.join(pickles)}); rlhf_jax reads "
                    "safetensors only, because loading pickle files can run arbitrary code. "
                    "Convert the checkpoint to model.safetensors first."
                )
            raise RlhfJaxError(
                f"{folder}: no model.safetensors or model.safetensors.index.json found"
            )
        self.folder = folder
        self._handles: dict[Path, object] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.file_of:
            raise RlhfJaxError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = _open(file)
        try:
            return self._handles[file].get_tensor(name)
        except Exception as e:
            raise RlhfJaxError(f"{file}: cannot read tensor '{name}' ({e})") from None


def _reader(
    index: _TensorIndex, src: Source, shape: tuple, np_dtype
) -> Callable[[tuple], np.ndarray]:
    """Callback for `make_array_from_callback`: builds only the requested slice.

    For stacked layers the first index selects layers, and only those layers are read.
    """

    def read(idx: tuple) -> np.ndarray:
        if not src.per_layer:
            arr = src.convert(index.get(src.hf_name))
            if arr.shape != shape:
                raise RlhfJaxError(
                    f"{index.folder}: tensor '{src.hf_name}' has shape {arr.shape} after "
                    f"conversion, expected {shape} from config.json"
                )
            return np.asarray(arr[idx], dtype=np_dtype)
        layer_idx = idx[0] if idx else slice(None)
        layers = range(shape[0])[layer_idx]
        parts = []
        for i in layers:
            arr = src.convert(index.get(src.hf_name.format(i=i)))
            if arr.shape != shape[1:]:
                raise RlhfJaxError(
                    f"{index.folder}: tensor '{src.hf_name.format(i=i)}' has shape {arr.shape} "
                    f"after conversion, expected {shape[1:]} from config.json"
                )
            parts.append(np.asarray(arr[idx[1:]] if idx else arr, dtype=np_dtype))
        return np.stack(parts)

    return read


def _read_params(
    folder: Path, config: ModelConfig, index: _TensorIndex, shardings, extra: tuple[str, ...] = ()
) -> dict:
    """Every parameter of `config` from the checkpoint's tensors (optionally straight into
    `shardings`); tensors the architecture does not use are an error, except `extra` ones
    the caller reads itself (a reward model's `score.weight`)."""
    sources = hf_sources(config, set(index.file_of))
    shapes = param_shapes(config)
    np_dtype = np.dtype(DTYPES[config.param_dtype])
    flat_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    flat_shardings = (
        treedef.flatten_up_to(shardings) if shardings is not None else [None] * len(flat_shapes)
    )
    leaves = []
    for (key_path, shape_dtype), sharding in zip(flat_shapes, flat_shardings):
        our_path = tuple(k.key for k in key_path)
        read = _reader(index, sources[our_path], tuple(shape_dtype.shape), np_dtype)
        if sharding is None:
            leaves.append(jnp.asarray(read(())))
        else:
            leaves.append(jax.make_array_from_callback(shape_dtype.shape, sharding, read))
    unused = (
        set(index.file_of)
        - set(extra)
        - {s.hf_name.format(i=i) for s in sources.values() for i in range(config.n_layers)}
    )
    # Buffers some exporters write (GPT-2's causal `attn.bias`, rotary caches) carry no weights.
    unused = {n for n in unused if not n.endswith((".attn.bias", ".masked_bias", "inv_freq"))}
    if unused:
        raise RlhfJaxError(
            f"{folder}: tensors not used by model_type '{config.model_type}': "
            f"{', '.join(sorted(unused)[:5])}{' ...' if len(unused) > 5 else ''}"
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_hf(
    path: str | os.PathLike,
    dtype: str = "float32",
    shardings=None,
    compute_dtype: str | None = None,
) -> tuple[ModelConfig, dict]:
    """Load a Hugging Face checkpoint folder as (ModelConfig, params).

    Args:
      path: folder with config.json and model.safetensors (or a sharded index); a URL is
        downloaded to the local cache first (`storage.local_copy`).
      dtype: parameter storage dtype, "float32" or "bfloat16".
      shardings: optional pytree (same structure as params) of `jax.sharding.Sharding`; each
        device then receives only its shard. Default: everything on the default device.
      compute_dtype: computation dtype (default: same as `dtype`).
    """
    folder = local_copy(path, "model folder")
    config = read_hf_config(folder).replace(param_dtype=dtype, dtype=compute_dtype or dtype)
    index = _TensorIndex(folder)
    if SCORE in index.file_of:
        raise RlhfJaxError(
            f"{folder}: holds a sequence-classification (reward) model ({SCORE}), not a "
            "language model with an LM head"
        )
    return config, _read_params(folder, config, index, shardings)


def host_arrays(tree):
    """Every array of `tree` whole on the host (gathered from all processes when sharded
    across hosts: every process must call this)."""
    return jax.tree.map(
        lambda x: np.asarray(
            multihost_utils.process_allgather(x, tiled=True)
            if isinstance(x, jax.Array) and not x.is_fully_addressable
            else x
        ),
        tree,
    )


def save_hf(config: ModelConfig, params: dict, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write params as a folder `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Every process must call this with the same arguments when params are sharded across hosts;
    only process 0 writes. Returns the folder (an `epath.Path` when `path` is a bucket URL).
    """
    host_params = host_arrays(params)
    if jax.process_index() != 0:
        return output_path(path)
    with writable_folder(path) as folder:  # a URL: written locally, then uploaded
        folder.mkdir(parents=True, exist_ok=True)
        tensors = to_hf_tensors(config, host_params)
        tmp = folder / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(to_hf_config(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
    return output_path(path)


# Any of these makes a folder hold a tokenizer AutoTokenizer can load (fast, sentencepiece,
# byte-level BPE); without one, transformers asks to install libraries that would not help.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a checkpoint (never with trust_remote_code).

    The folder is checked as a checkpoint first (config.json, safetensors weights), so a
    folder of pickle weights is refused for that reason rather than for its tokenizer."""
    from transformers import AutoTokenizer

    folder = local_copy(path, "model folder")
    read_hf_config(folder)
    _TensorIndex(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise RlhfJaxError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the tokenizer "
            "of the model this checkpoint comes from into the folder"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())  # transformers' messages span several lines
        raise RlhfJaxError(f"{path}: could not load a tokenizer ({reason})") from None


SCALAR_HEAD_FILE = "scalar_head.safetensors"  # reward models saved before version 0.2
SCORE = "score.weight"  # transformers' sequence-classification head, [num_labels, d_model]
REWARD_BIAS_KEY = "rlhf_jax_reward_bias"  # config.json: the bias transformers' head lacks
# config.json: where the reward is read. Saves without it come from an rlhf_jax that read the
# EOS itself, also with pad == EOS (where transformers reads the token before it).
REWARD_READ_KEY = "rlhf_jax_reward_read"
REWARD_READ_RULE = "last_non_pad_token"
SEQ_CLS_ARCHITECTURES = {
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
}


def save_scalar_model(
    config: ModelConfig, params: dict, path: str | os.PathLike, tokenizer=None
) -> Path:
    """A reward (or value) model `{"trunk", "head"}` as a folder that transformers'
    `AutoModelForSequenceClassification` loads (num_labels 1, the trunk under its usual names,
    `score.weight` = the head's kernel; the trunk's unused LM head is not written).

    transformers' score layer has no bias, so the head's bias (InstructGPT's shift that makes
    the demonstrations score 0) is written to config.json as `rlhf_jax_reward_bias`:
    rlhf_jax adds it back on load, and transformers' score equals ours minus it (a constant:
    rankings and pairwise probabilities are the same).
    """
    trunk = scalar_trunk(params["trunk"])
    host = jax.tree.map(
        lambda x: np.asarray(
            multihost_utils.process_allgather(x, tiled=True)
            if isinstance(x, jax.Array) and not x.is_fully_addressable
            else x
        ),
        {"trunk": trunk, "head": params["head"]},
    )
    if jax.process_index() != 0:
        return output_path(path)
    with writable_folder(path) as folder:  # a URL: written locally, then uploaded
        _write_scalar_model(config, host, folder, tokenizer)
    return output_path(path)


def _write_scalar_model(config: ModelConfig, host: dict, folder: Path, tokenizer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(config.replace(tie_embeddings=True), host["trunk"])  # no LM head
    tensors[SCORE] = np.ascontiguousarray(host["head"]["kernel"][None, :])
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    hf_config = {
        **to_hf_config(config),
        "architectures": [SEQ_CLS_ARCHITECTURES[config.model_type]],
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        REWARD_BIAS_KEY: float(host["head"]["bias"]),
        REWARD_READ_KEY: REWARD_READ_RULE,
    }
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (folder / SCALAR_HEAD_FILE).unlink(missing_ok=True)  # an older save in the same folder
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def is_reward_model(path: str | os.PathLike) -> bool:
    """Whether a folder holds a reward model (either format), not a language model."""
    folder = local_copy(path, "model folder")
    if (folder / SCALAR_HEAD_FILE).is_file():
        return True
    config_file = folder / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in raw.get("architectures") or [])


def load_scalar_model(
    path: str | os.PathLike,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    shardings=None,
) -> tuple[ModelConfig, dict]:
    """A reward model as (config, {"trunk", "head"}): a transformers sequence-classification
    folder (TRL's, OpenRLHF's, a public RM, or `save_scalar_model`'s; Llama, Qwen2, Qwen3,
    GPT-2) or an older rlhf_jax folder (a causal LM + `scalar_head.safetensors`).

    `shardings`: `config -> {"trunk", "head"} shardings` (the config is read here), so that
    each device receives only its shards, as `load_hf` does; default: one device.

    The reward is read where transformers reads it: the last real token that is not the pad
    token (`config.pad_token_id`); with pad == EOS, the token before the EOS
    (`models.reward_token_index`)."""
    folder = local_copy(path, "reward model folder")
    if (folder / SCALAR_HEAD_FILE).is_file():
        return _load_legacy_scalar_model(folder, dtype, compute_dtype)
    index = _TensorIndex(folder)
    if SCORE not in index.file_of:
        raise RlhfJaxError(
            f"{folder}: not a reward model: no {SCORE} (a transformers sequence-classification "
            f"model) and no {SCALAR_HEAD_FILE}; this looks like a language model"
        )
    # The trunk of a scalar model never uses an LM head, and the folder has none.
    config = read_hf_config(folder).replace(
        param_dtype=dtype, dtype=compute_dtype or dtype, tie_embeddings=True
    )
    placed = shardings(config) if shardings is not None else None
    trunk_sh = placed["trunk"] if placed is not None else None
    trunk = _read_params(folder, config, index, trunk_sh, extra=(SCORE, "score.bias"))
    score = index.get(SCORE)
    if score.shape != (1, config.d_model):
        raise RlhfJaxError(
            f"{folder}: {SCORE} has shape {list(score.shape)}; a reward model has one label "
            f"(shape [1, {config.d_model}])"
        )
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    bias = float(raw.get(REWARD_BIAS_KEY, 0.0))
    if "score.bias" in index.file_of:
        bias += float(index.get("score.bias").reshape(-1)[0])
    head = {
        "kernel": jnp.asarray(score[0], DTYPES[dtype]),
        "bias": jnp.asarray(bias, DTYPES[dtype]),
    }
    if placed is not None:
        head = jax.device_put(head, placed["head"])
    return config, {"trunk": trunk, "head": head}


def _load_legacy_scalar_model(folder: Path, dtype: str, compute_dtype: str | None):
    config, trunk = load_hf(folder, dtype=dtype, compute_dtype=compute_dtype)
    head_file = folder / SCALAR_HEAD_FILE
    with _open(head_file) as f:
        head = {k: jnp.asarray(f.get_tensor(k), DTYPES[dtype]) for k in ("kernel", "bias")}
    if head["kernel"].shape != (config.d_model,):
        raise RlhfJaxError(
            f"{head_file}: kernel shape {head['kernel'].shape} does not match d_model "
            f"{config.d_model}"
        )
    return config, {"trunk": scalar_trunk(trunk), "head": head}
