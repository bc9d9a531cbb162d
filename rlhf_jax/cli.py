"""`rlhf-jax` command line. The only place (with loops/) that prints, reads argv or exits.

Errors in the user's input (RlhfJaxError) are printed as one line, `error: ...`, with exit
code 2 and no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rlhf_jax.errors import RlhfJaxError


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
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from rlhf_jax.models import load_hf, load_tokenizer
    from rlhf_jax.rollout import generate

    if args.max_new_tokens < 1:
        raise RlhfJaxError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    tokenizer = load_tokenizer(args.model)
    config, params = load_hf(args.model, dtype=args.dtype)
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        tokenizer.pad_token_id = pad_id
    enc = tokenizer(args.prompt, return_tensors="np", padding=True)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    try:
        out = generate(
            config,
            params,
            enc["input_ids"].astype(np.int32),
            enc["attention_mask"],
            jax.random.key(args.seed),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=eos,
            pad_id=pad_id,
        )
    except ValueError as e:
        raise RlhfJaxError(str(e)) from None
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    for row_tokens, row_mask in zip(tokens, mask):
        print(tokenizer.decode(row_tokens[row_mask > 0], skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-jax", description="InstructGPT-style RLHF in JAX/Flax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RlhfJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
