"""What shapes a stage's result, stored with its checkpoints, so that a rerun with other settings
is refused instead of silently resuming from (or reusing) a checkpoint trained on something else.

A stage's settings are its config sections flattened to `key: value` (`sft.optim.lr: 0.001`)
plus a digest of every file and model folder it reads. Keys that do not change what is trained
(logging, checkpointing, the mesh, evaluation) are left out, so changing them never blocks a
resume.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from rlhf_jax.config import Config
from rlhf_jax.config.schema import PATHS
from rlhf_jax.storage import is_url, local_copy

# Sections read by nobody's training: changing them must not block a resume.
NOT_SHAPING = ("log", "checkpoint", "mesh", "distributed", "eval", "compare")
# Inside shaping sections: switches that change memory or speed, never the numbers.
NOT_SHAPING_KEYS = ("model.remat",)
_CHUNK = 1 << 16


def _path_keys() -> frozenset[str]:
    """`model.path`, `sft.data`, ...: every key that names a file or folder. Their spelling
    (relative or absolute, from which working folder) never shapes training; what they hold
    does, and is recorded as `file:<key>`."""
    sections = {
        type(getattr(Config(), f.name)).__name__: f.name for f in dataclasses.fields(Config)
    }
    return frozenset(f"{sections[cls]}.{name}" for cls, names in PATHS.items() for name in names)


PATH_KEYS = _path_keys()


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif prefix in PATH_KEYS and value is not None:  # recorded for people, absolute
        out[prefix] = json.dumps(value if is_url(value) else str(Path(value).resolve()))
    elif prefix not in NOT_SHAPING_KEYS:
        out[prefix] = json.dumps(value, sort_keys=True, default=str)


def file_digest(path: str | Path) -> str:
    """sha256 of a data file's bytes (the loaders read it whole anyway)."""
    h = hashlib.sha256()
    with local_copy(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def folder_digest(path: str | Path) -> str:
    """A model folder's identity: its config.json and tokenizer files whole, and each weight
    file's size and 16 evenly spaced 64 KiB samples of it (another model of the same shapes
    differs there; reading gigabytes whole at every start would not be worth it)."""
    folder = local_copy(path)
    h = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            if file.suffix != ".safetensors":
                h.update(f.read())
                continue
            for i in range(16):
                f.seek(max(0, (size - _CHUNK) * i // 15))
                h.update(f.read(_CHUNK))
    return h.hexdigest()[:16]


def stage_settings(
    cfg: Config, sections: tuple[str, ...], reads: dict[str, str | Path | None] | None = None
) -> dict[str, str]:
    """`{key: value}` of the config sections that shape a stage (dotted sub-keys such as
    "ppo" or "seed" work too), and `{"file:<key>": digest}` of what it reads ({config key:
    path of a file or model folder}; None entries are skipped)."""
    whole = dataclasses.asdict(cfg)
    out: dict[str, str] = {}
    for name in sections:
        if name in NOT_SHAPING:
            raise ValueError(f"section {name!r} does not shape training")
        _flatten(whole[name], name, out)
    # LoRA shapes every stage that fine-tunes (not pretraining). Recorded only when on, so
    # checkpoints written before the section existed still resume.
    if cfg.lora.rank > 0 and set(sections) & {"sft", "rm", "dpo", "ppo"}:
        _flatten(whole["lora"], "lora", out)
    for key, path in (reads or {}).items():
        if path is None:
            continue
        p = local_copy(path)
        out[f"file:{key}"] = folder_digest(p) if p.is_dir() else file_digest(p)
    return out


@functools.cache
def _defaults() -> dict[str, str]:
    out: dict[str, str] = {}
    _flatten(dataclasses.asdict(Config()), "", out)
    return out


def differences(saved: dict[str, str], now: dict[str, str]) -> list[str]:
    """Human lines for the keys whose values differ, e.g. "sft.optim.lr: 0.001 -> 0.0001".
    A key the saved settings lack that is now at its default is an option added since
    (`model.frozen_dtype`, ...): at its default it reproduces the old run, so it is no
    difference. Paths are compared by what they hold (`file:<key>`), not by how they are
    spelt."""
    lines = []
    for key in sorted(saved.keys() | now.keys()):
        if key in PATH_KEYS:  # the same files spelt otherwise; their contents are compared
            continue
        a, b = saved.get(key, "(absent)"), now.get(key, "(absent)")
        if key not in saved and b == _defaults().get(key):
            continue
        if a != b:
            what = "contents changed" if key.startswith("file:") else f"{a} -> {b}"
            lines.append(f"{key.removeprefix('file:')}: {what}")
    return lines


# The pipeline's stages, each shaped by its own sections and all those upstream of it.
PIPELINE_SECTIONS = {
    "pretrain": ("seed", "model", "data", "task", "pretrain"),
    "sft": ("seed", "model", "data", "task", "pretrain", "sft"),
    "rm": ("seed", "model", "data", "task", "pretrain", "sft", "rm"),
    "rl": ("seed", "model", "data", "task", "pretrain", "sft", "rm", "ppo", "ptx"),
    # offline preference runs train on the RM's rankings (rm.* shapes them) from SFT
    "dpo": ("seed", "model", "data", "task", "pretrain", "sft", "rm", "dpo"),
}


def pipeline_settings(cfg: Config, stage: str) -> dict[str, str]:
    """Settings of a pipeline stage ("pretrain", "sft", "rm", "rl" or "dpo"), with the user's files
    it depends on (the generated ones follow from the sections)."""
    reads = {"model.path": cfg.model.path, "sft.data": cfg.sft.data}
    if stage in ("rm", "rl", "dpo"):
        reads["rm.data"] = cfg.rm.data
    if stage == "rl":
        reads["ppo.prompts"] = cfg.ppo.prompts
        reads["ptx.data"] = cfg.ptx.data if cfg.ptx.coef > 0 else None
    return stage_settings(cfg, PIPELINE_SECTIONS[stage], reads)
