"""`rlhf-jax eval`: exact-answer accuracy of a Hugging Face model folder on a JSONL of prompts
with reference answers (`{"prompt": "...", "answer": "72"}`), by `loops/answer_eval.py`.

Greedy decoding always (pass@1 with its Wilson interval); with `--samples N`, N samples per
prompt at `--temperature` as well (unbiased pass@k, mean@N with a bootstrap interval over
prompts). Strict (`#### N`) and lenient (last number) answers, the format rate, and the mean
score of the reward function `--reward` over the same completions. Printed as a table, and
written as JSON with `--output`. This module imports no JAX until the command runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from rlhf_jax.config.schema import AT_LEAST_0, AT_LEAST_1
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.flags import SEED, add_number

ANSWER_FIELD = "answer"


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """The `eval` subcommand's flags."""
    text = (
        "exact-answer accuracy (GSM8K-style) of a model folder on prompts with an 'answer' "
        "field: greedy pass@1, and pass@k / mean@N with --samples"
    )
    p = sub.add_parser("eval", help=text, description=text)
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    p.add_argument(
        "--data", required=True, help="JSONL of prompt rows, each with an 'answer' field"
    )
    p.add_argument(
        "--reward",
        required=True,
        help="reward function whose mean score is reported too (e.g. gsm8k_strict, boxed, "
        "or package.module:function)",
    )
    p.add_argument(
        "--reward-kwargs",
        default="{}",
        help='its hyperparameters as a JSON object, e.g. \'{"correct": 1, "wrong": -1}\'',
    )
    add_number(p, "--samples", int, AT_LEAST_1, default=None, help="N samples per prompt")
    add_number(p, "--temperature", float, AT_LEAST_0, default=1.0, help="of --samples")
    add_number(p, "--max-new-tokens", int, AT_LEAST_1, default=256)
    add_number(p, "--batch-size", int, AT_LEAST_1, default=32, help="rows per generate call")
    add_number(p, "--seed", int, SEED, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send plain prompt rows through the tokenizer's chat template as user messages "
        "(chat rows always are)",
    )
    p.add_argument("--output", help="write the report as JSON to this file (or gs://, s3:// URL)")
    p.set_defaults(run=run_eval)


def reference_answers(examples: Sequence) -> list[str | int | float]:
    """Each prompt row's `answer` field, or a one-line RlhfJaxError naming the row."""
    out = []
    for e in examples:
        if ANSWER_FIELD not in e.fields:
            raise RlhfJaxError(
                f"{e.where}: field {ANSWER_FIELD!r}: missing (rlhf-jax eval needs each row's "
                "reference answer)"
            )
        value = e.fields[ANSWER_FIELD]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            kind = "boolean" if isinstance(value, bool) else type(value).__name__
            raise RlhfJaxError(
                f"{e.where}: field {ANSWER_FIELD!r}: expected a string or a number, got {kind}"
            )
        out.append(value)
    return out


def _reward_kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RlhfJaxError(f"--reward-kwargs: not JSON ({e.msg}): {text!r:.80}") from None
    if not isinstance(value, dict):
        raise RlhfJaxError(f"--reward-kwargs: expected a JSON object, got {text!r:.80}")
    return value


def run_eval(args: argparse.Namespace) -> int:
    """Check every input (data, reward function, model folder) before loading weights, then
    evaluate, print the table and write the report."""
    from rlhf_jax.data import load_prompts
    from rlhf_jax.rewards import field_lists, get_reward_fn
    from rlhf_jax.storage import check_location, output_path

    if args.samples is not None and args.temperature <= 0:
        raise RlhfJaxError(
            f"--samples {args.samples} needs --temperature > 0 (greedy decoding gives the same "
            "completion every time; greedy pass@1 is always reported)"
        )
    check_location(args.model, "--model")
    if args.output:  # a local file or a bucket URL, checked before any weights load
        check_location(args.output, "--output", output=True)
    examples, _ = load_prompts(args.data)
    references = reference_answers(examples)
    texts = [e.text() for e in examples]
    reward_fn = get_reward_fn(args.reward, **_reward_kwargs(args.reward_kwargs))
    field_lists(reward_fn, texts, args.reward)  # every row has the fields it needs
    report = _evaluate(args, examples, texts, references, reward_fn)
    print(format_table(report))
    if args.output:
        path = output_path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)  # (a bucket has no folders: no-op)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _evaluate(args, examples, texts, references, reward_fn) -> dict:
    import numpy as np

    from rlhf_jax.loops.answer_eval import evaluate_answers
    from rlhf_jax.loops.checks import check_tokenizer
    from rlhf_jax.loops.evaluate import bootstrap_mean_ci
    from rlhf_jax.models import load_hf, load_tokenizer
    from rlhf_jax.models.hf import read_hf_config
    from rlhf_jax.rewards import score_texts

    tokenizer = load_tokenizer(args.model)
    check_tokenizer(read_hf_config(args.model), args.model, tokenizer)  # before the weights
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise RlhfJaxError(f"--chat: the tokenizer of {args.model} has no chat template")
    config, params = load_hf(args.model, dtype=args.dtype)
    runs = {"greedy": (1, 0.0)}
    if args.samples is not None:
        runs["sampled"] = (args.samples, args.temperature)
    report = {"model": str(args.model), "data": str(args.data), "reward": args.reward}
    for name, (samples, temperature) in runs.items():
        result = evaluate_answers(
            config,
            params,
            tokenizer,
            examples,
            references,
            samples=samples,
            temperature=temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            batch_size=args.batch_size,
            chat_template=args.chat,
        )
        groups = result.pop("completions")
        prompts = [t for t in texts for _ in range(samples)]
        flat = [c for g in groups for c in g]
        scores = score_texts(reward_fn, prompts, flat, args.reward)
        per_prompt = scores.astype(np.float64).reshape(len(groups), samples).mean(axis=1)
        low, high = bootstrap_mean_ci(per_prompt, 2000, args.seed)
        result["temperature"] = temperature
        result["reward_mean"] = float(per_prompt.mean())
        result["reward_mean_ci"] = [low, high]
        result["examples"] = [
            {"prompt": str(t), "completion": g[0]} for t, g in zip(texts, groups)
        ][:3]
        report[name] = result
    return report


def _cell(block: dict, key: str) -> str:
    low, high = block[f"{key}_ci"]
    return f"{block[key]:.3f} [{low:.3f}, {high:.3f}]"


def format_table(report: dict) -> str:
    """The report as a small table: one row per rate, strict and lenient side by side."""
    greedy = report["greedy"]
    lines = [
        f"{report['model']} on {report['data']}: {greedy['n_prompts']} prompts (95% intervals)",
        f"{'':<24}{'strict':<26}{'lenient':<26}",
        f"{'greedy pass@1':<24}{_cell(greedy['strict'], 'pass@1'):<26}"
        f"{_cell(greedy['lenient'], 'pass@1'):<26}",
    ]
    rows = [("greedy", greedy)]
    sampled = report.get("sampled")
    if sampled is not None:
        n, t = sampled["samples"], sampled["temperature"]
        for k in sampled["strict"]["pass@k"]:
            lines.append(
                f"{f'pass@{k} (N={n}, T={t:g})':<24}{sampled['strict']['pass@k'][k]:<26.3f}"
                f"{sampled['lenient']['pass@k'][k]:<26.3f}"
            )
        lines.append(
            f"{f'mean@{n}':<24}{_cell(sampled['strict'], 'mean@n'):<26}"
            f"{_cell(sampled['lenient'], 'mean@n'):<26}"
        )
        rows.append(("sampled", sampled))
    for name, result in rows:
        lines.append(f"{f'format rate ({name})':<24}{result['format_rate']:.3f}")
        reward = f"{result['reward_mean']:.3f} [{result['reward_mean_ci'][0]:.3f}, "
        reward += f"{result['reward_mean_ci'][1]:.3f}]"
        label = f"{report['reward']} ({name})"
        lines.append(f"{label:<24}{reward}")
    return "\n".join(lines)
