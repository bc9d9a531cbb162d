"""`rlhf-jax` command line. The only place (with loops/) that prints, reads argv or exits.

Errors in the user's input (RlhfJaxError) are printed as one line, `error: ...`, with exit
code 2 and no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

from rlhf_jax.config.schema import AT_LEAST_0, AT_LEAST_1, Range
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.flags import SEED, add_number
from rlhf_jax.host_memory import keep_freed_host_memory
from rlhf_jax.loops.output_lock import release_output_locks
from rlhf_jax.stage_registry import load as load_ref
from rlhf_jax.stage_registry import stages


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="complete a prompt with a local Hugging Face checkpoint folder",
        description="Print the completion of PROMPT by the model in a local checkpoint folder.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors)")
    p.add_argument(
        "--prompt", required=True, action="append", help="prompt text; repeat for a batch"
    )
    add_number(
        p,
        "--max-new-tokens",
        int,
        AT_LEAST_1,
        default=None,
        help="default: 64, or fewer if the model's position table ends sooner",
    )
    add_number(
        p,
        "--temperature",
        float,
        AT_LEAST_0,
        default=0.0,
        help="0 = greedy (default); a tiny temperature gives the greedy tokens too",
    )
    add_number(p, "--top-k", int, AT_LEAST_1, default=None)
    add_number(p, "--top-p", float, Range(0, 1, lo_open=True), default=None)
    add_number(p, "--seed", int, SEED, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message through the tokenizer's chat template (for a "
        "model fine-tuned on chat rows)",
    )
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from rlhf_jax.loops.checks import check_positions, check_tokenizer
    from rlhf_jax.models import load_hf, load_tokenizer
    from rlhf_jax.models.hf import read_hf_config
    from rlhf_jax.rollout import generate
    from rlhf_jax.storage import check_location

    # Ctrl-C ends generation at once, even inside the compiled decode loop (which gives the
    # interpreter no chance to raise KeyboardInterrupt); SIGTERM keeps its default too.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    check_location(args.model, "--model")
    tokenizer = load_tokenizer(args.model)
    check_tokenizer(read_hf_config(args.model), args.model, tokenizer)  # before the weights
    config, params = load_hf(args.model, dtype=args.dtype)
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        tokenizer.pad_token_id = pad_id
    prompts = args.prompt
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RlhfJaxError(f"--chat: the tokenizer of {args.model} has no chat template")
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    # A chat template writes its own BOS; plain prompts get the tokenizer's special tokens.
    enc = tokenizer(prompts, return_tensors="np", padding=True, add_special_tokens=not args.chat)
    lengths = enc["attention_mask"].sum(axis=1)
    if enc["input_ids"].shape[1] == 0 or lengths.min() == 0:
        i = int(lengths.argmin()) if lengths.size else 0
        raise RlhfJaxError(
            f"--prompt number {i + 1} is empty after tokenising ({args.prompt[i]!r}): the model "
            "needs at least one token to continue"
        )
    max_new = args.max_new_tokens
    if max_new is None:  # not asked for: stay inside the positions the model was trained on
        max_new = max(1, min(64, config.max_position_embeddings - int(lengths.max())))
    check_positions(
        config, args.model, {"the prompt + --max-new-tokens": int(lengths.max()) + max_new}
    )
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    try:
        out = generate(
            config,
            params,
            enc["input_ids"].astype(np.int32),
            enc["attention_mask"],
            jax.random.key(args.seed),
            max_new,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=eos,
            pad_id=pad_id,
        )
    except ValueError as e:
        raise RlhfJaxError(str(e)) from None
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    texts = [tokenizer.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]
    if len(texts) == 1:
        print(texts[0])
    else:  # completions may contain newlines: number them
        for i, text in enumerate(texts):
            print(f"[{i}] {text}")
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/); defaults when omitted")
    p.add_argument("--output", required=True, help="folder for checkpoints, metrics, report")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. ppo.beta=0.05 sft.optim.lr=1e-4",
    )


# Handlers to put back when a command ends (the training commands' preemption handler).
_RESTORE_SIGNALS: list = []
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C


def _exit_interrupted() -> None:
    """A second Ctrl-C while a stage was stopping: end the process now, as a kill would
    (committed checkpoints are kept, a save in flight is dropped and cleaned up by the next
    run). Not by raising KeyboardInterrupt: that would unwind through orbax's wait for the
    save (which logs it as a failed save, with its traceback) and then tear the interpreter
    down while the save's threads still run."""
    _end_process(INTERRUPTED, "error: interrupted")


def _end_process(code: int, line: str | None = None) -> None:
    """Flush what was printed, write `line` to stderr, and end the process with `code`,
    skipping the interpreter's teardown. Safe inside a signal handler."""
    for stream in (sys.stdout, sys.stderr):
        # a closed or hung-up stream; RuntimeError: the signal came in the middle of a write
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            stream.flush()
    if line is not None:
        with contextlib.suppress(OSError):
            os.write(2, (line + "\n").encode())  # not print: no buffer to re-enter
    os._exit(code)


def _check_locations(cfg, output: str | None) -> None:
    """Every URL the run reads or writes has its filesystem installed (and the output is one
    orbax can write checkpoints to): a one-line error now, not after a stage has trained."""
    from rlhf_jax.loops.settings import PATH_KEYS
    from rlhf_jax.storage import check_location

    if output is not None:
        check_location(output, "--output", output=True)
    for key in sorted(PATH_KEYS):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            check_location(value, f"config key '{key}'")


def _load_config(args: argparse.Namespace):
    """A training command's config and its RL algorithm (`ppo`'s parts, resolved here once
    for the whole run and handed to the command); joins a multi-process run first, before any
    device is touched. Only then do SIGTERM/SIGINT/SIGHUP become a request to save and stop at
    the next step: until then (and in `generate`) they end the process as usual, so a run stuck
    waiting for a process that never comes can be stopped."""
    from rlhf_jax.checkpointing import install_preemption_handler
    from rlhf_jax.config import Config, load_config
    from rlhf_jax.sharding import initialize
    from rlhf_jax.sharding.distributed import resolve
    from rlhf_jax.steps import resolve_config_parts

    cfg = load_config(Config, args.config, args.overrides)
    _check_locations(cfg, getattr(args, "output", None))
    address, n, pid = resolve(cfg.distributed)
    if n is not None and n > 1:  # said before the wait: a run stuck there shows why
        print(
            f"process {pid} of {n}: joining the run at {address}; waiting until all {n} "
            "processes have joined (SIGTERM / Ctrl-C stops the wait)",
            file=sys.stderr,
            flush=True,
        )
    initialize(cfg.distributed)  # before anything touches a device (the check below does)
    _RESTORE_SIGNALS.append(install_preemption_handler(second_interrupt=_exit_interrupted))
    # Every loss, estimator and reward function the config names, resolved now: a typo fails
    # here, not after the stages before the one that uses it have run.
    return cfg, resolve_config_parts(cfg)


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="run SFT -> reward model -> PPO-ptx -> evaluation (the built-in task by default)",
        description="Run the whole InstructGPT pipeline and write DIR/report.json, report.md, "
        "curves.png, metrics.jsonl and the sft/, policy/ checkpoints.",
    )
    _add_config_args(p)
    p.set_defaults(run=_run_pipeline)


def _run_pipeline(args: argparse.Namespace) -> int:
    from rlhf_jax.loops.pipeline import run_pipeline
    from rlhf_jax.loops.rlvr import summary_line
    from rlhf_jax.tasks import VERIFIABLE

    cfg, algo = _load_config(args)
    command = "rlhf-jax " + " ".join(sys.argv[1:]) if sys.argv else ""
    report = run_pipeline(cfg, args.output, command, algo=algo)
    print(f"report: {args.output}/report.md")
    if cfg.task.name in VERIFIABLE:
        print(summary_line(report))
        return 0
    print(
        f"gold reward SFT {report['sft']['gold_reward']:.3f} -> PPO "
        f"{report['ppo']['gold_reward']:.3f}; win rate {report['ppo']['win_rate_vs_sft']:.2f}; "
        f"RM held-out accuracy {report['rm']['heldout_accuracy']:.3f}; "
        f"{report['wall_seconds']:.0f} s"
    )
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="run several RL algorithms (compare.algorithms) from the same SFT and reward model",
        description="Build the pipeline's foundation (data, SFT, reward model) once, run every "
        "algorithm of compare.algorithms from it (each again on compare.reward_fn), and write "
        "DIR/report.md, report.json and gold_vs_kl.png.",
    )
    _add_config_args(p)
    p.set_defaults(run=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from rlhf_jax.errors import RlhfJaxError
    from rlhf_jax.loops.compare import run_compare

    cfg, _ = _load_config(args)
    if not cfg.compare.algorithms and not cfg.compare.preference:
        raise RlhfJaxError("`rlhf-jax compare` needs config key 'compare.algorithms' or "
                           "'compare.preference' (see configs/compare.yaml)")  # fmt: skip
    command = "rlhf-jax " + " ".join(sys.argv[1:]) if sys.argv else ""
    report = run_compare(cfg, args.output, command)
    print(f"report: {args.output}/report.md")
    if "accuracy" in report["sft"]:  # a verifiable-reward task (loops/compare_rlvr.py)
        from rlhf_jax.loops.compare_rlvr_report import summary_lines

        print("\n".join(summary_lines(report)))
        return 0
    sft = report["sft"]["gold_reward"]
    for name, row in sorted(report["algorithms"].items(), key=lambda kv: -kv[1]["gold_reward"]):
        lo, hi = row["gold_reward_ci"]
        print(
            f"{name:>24}: gold {row['gold_reward']:.3f} [{lo:.3f}, {hi:.3f}] (SFT {sft:.3f}), "
            f"KL {row['kl_to_sft']:.2f}, {row['wall_seconds']:.0f} s"
        )
    return 0


def _add_stage(sub: argparse._SubParsersAction, stage) -> None:
    """The subcommand of a registered stage (`rlhf_jax.stage_registry.StageDef`): its config
    loaded, the settings it would ignore refused (loops/usage.py), then its `run`."""
    p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
    _add_config_args(p)

    def run(args: argparse.Namespace) -> int:
        from rlhf_jax.loops.usage import refuse_unread

        cfg, algo = _load_config(args)
        refuse_unread(cfg, stage.name)
        folder = load_ref(stage.run)(cfg, args.output, algo=algo)
        print(f"saved: {folder}")
        return 0

    p.set_defaults(run=run)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from rlhf_jax.loops.eval_command import add_eval_parser  # imports no JAX

    add_eval_parser(sub)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from rlhf_jax.plan.command import add_plan_parser  # imports no JAX

    add_plan_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-jax", description="InstructGPT-style RLHF in JAX/Flax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pipeline(sub)
    _add_compare(sub)
    for stage in stages():  # rlhf_jax/stage_registry.py: the built-in ones and a fork's
        if stage.run is not None:
            _add_stage(sub, stage)
    _add_generate(sub)
    _add_eval(sub)
    _add_plan(sub)
    return parser


class _NeverRaised(Exception):
    """Stands for `StagePaused` until its module is imported."""


def main(argv: Sequence[str] | None = None) -> int:
    # transformers' import-time advice ("PyTorch was not found ...") would turn every one-line
    # error of a torch-free install (PyTorch is a test-time reference only) into two lines.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Before JAX starts its CPU backend: reuse freed temporaries instead of faulting them in
    # again at every step, while the process is far from its memory limit (see host_memory).
    try:
        keep_freed_host_memory()
    except RlhfJaxError as e:  # a malformed RLHF_JAX_MALLOC_KEEP_BELOW
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except RlhfJaxError as e:  # a numeric flag outside its range (flags.py)
        print(f"error: {e}", file=sys.stderr)
        return 2
    # key=value overrides may also come after options (argparse stops positionals at them)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    # Bound before the try: an import that fails for another reason (e.g. jax not installed)
    # must reach the user as itself, not as an unbound name in the `except` clauses below.
    stage_paused: type[BaseException] = _NeverRaised
    try:
        # Inside the try: a Ctrl-C while jax is still importing is a plain "interrupted" too.
        from rlhf_jax.loops.resume import StagePaused as stage_paused

        return args.run(args)
    except RlhfJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Disk full, a folder that cannot be written, a file that vanished: the reason and the
        # path, not a traceback. Saved checkpoints are untouched (see docs/errors.md).
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before a training command took over SIGINT
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except stage_paused as e:  # (after KeyboardInterrupt: the import may have been cut short)
        print(f"stopped: {e}", file=sys.stderr)
        return 0
    finally:
        for restore in _RESTORE_SIGNALS:
            restore()
        _RESTORE_SIGNALS.clear()
        release_output_locks()


def console() -> None:
    """The `rlhf-jax` program: `main`, then exit with its code. After a Ctrl-C the process
    ends at once (os._exit), skipping the interpreter's teardown, which would run while JAX's
    compile and orbax's save threads may still be at work."""
    code = main()
    if code == INTERRUPTED:
        _end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
