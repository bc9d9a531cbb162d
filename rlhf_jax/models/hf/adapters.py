"""LoRA adapters written alone, in the layout PEFT reads (`PeftModel.from_pretrained` on the
transformers base model): `adapter_model.safetensors` + `adapter_config.json`.

Per layer and projection, A [*in, r] becomes `lora_A.weight` [r, in] and B [r, *out]
`lora_B.weight` [out, r], with the input and output dimensions flattened in the order the
merged kernel uses (`weights_map`), and PEFT's scaling is ours: alpha / r.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf.io import host_arrays
from rlhf_jax.storage import output_path, writable_folder

# Our projection names -> the Llama/Qwen module paths inside a decoder layer.
MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def peft_tensors(config: ModelConfig, adapters: dict) -> dict[str, np.ndarray]:
    """`{PEFT tensor name: array}` of a model's adapters (`models.lora.split_adapters`)."""
    out = {}
    layers = jax.device_get(adapters["layers"])
    for group in ("attn", "mlp"):
        for name, node in layers.get(group, {}).items():
            a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
            r = config.lora_rank
            for i in range(config.n_layers):
                prefix = f"base_model.model.model.layers.{i}.{MODULES[name]}"
                out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
                out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return out


def save_adapters(
    config: ModelConfig, adapters: dict, path: str | os.PathLike, base_model: str | None = None
) -> Path:
    """Write `adapters` of an adapted `config` (lora_rank > 0) as a PEFT adapter folder;
    `base_model` (the folder they were trained on) goes into its config for PEFT to find.
    Every process calls this when the adapters are sharded across hosts; process 0 writes."""
    if config.model_type == "gpt2":
        raise RlhfJaxError(
            "lora.save_adapters: GPT-2's attention is one fused c_attn matrix in transformers, "
            "which separate q/k/v adapters do not map onto; the merged weights are written"
        )
    adapters = host_arrays(adapters)
    if jax.process_index() != 0:
        return output_path(path)
    with writable_folder(path) as folder:  # a URL: written locally, then uploaded
        _write_adapters(config, adapters, folder, base_model)
    print(f"saved adapters: {output_path(path)}")
    return output_path(path)


def _write_adapters(config: ModelConfig, adapters: dict, folder: Path, base_model) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(peft_tensors(config, adapters), str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(MODULES[t].split(".")[-1] for t in config.lora_targets),
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
