"""A fork's stage, added by one registration in this file (no library edit): `rlhf-jax
fork_echo` writes what it was handed, its settings are checked like every command's, and
`rlhf-jax plan` lists it (its programs are the SFT stage's, built by the library's builder)."""

import json
from pathlib import Path

from rlhf_jax.loops.usage import Unread
from rlhf_jax.stage_registry import StageDef, register_stage


def run_echo(cfg, out_dir, *, algo) -> Path:
    """Write OUT/echo/echo.json: the settings it reads and the algorithm it was handed."""
    folder = Path(out_dir) / "echo"
    folder.mkdir(parents=True, exist_ok=True)
    seen = {"seed": cfg.seed, "sft.steps": cfg.sft.steps, "policy_loss": algo.policy_loss.func}
    seen["policy_loss"] = getattr(seen["policy_loss"], "__name__", "?")
    (folder / "echo.json").write_text(json.dumps(seen))
    return folder


def build_echo(cfg, runtime, algo):
    from rlhf_jax.plan.planner import build_sft

    build = build_sft(cfg, runtime, algo)
    build.name = "fork_echo"
    return build


ECHO = StageDef(
    "fork_echo",
    "write the settings this toy stage reads (a fork's stage, tests/fork_stage.py)",
    ("seed", "sft"),
    run=run_echo,
    build=build_echo,
    planned=lambda cfg: cfg.sft.steps > 0,
    unread=(Unread(("sft.batch_size",), "the toy stage trains nothing"),),
)
register_stage(ECHO)
