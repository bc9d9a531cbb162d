"""Tokenise validated examples into fixed-shape NumPy arrays (int32 ids, float32 masks).

Masks come from token counts, never from comparing ids with the pad id, so a tokenizer whose
pad token equals its EOS is still handled. A prompt longer than its maximum is an error naming
the row (prompts are never silently cut); a completion or text that does not fit is truncated
and counted in the report.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from rlhf_jax.data.jsonl import RowError
from rlhf_jax.data.load import DataReport
from rlhf_jax.data.records import PromptExample, RankingExample, SFTExample, TextExample
from rlhf_jax.errors import RlhfJaxError


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos, pad) ids; pad falls back to EOS when the tokenizer has none."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RlhfJaxError("the tokenizer has no EOS token; set one before training")
    pad = tokenizer.pad_token_id
    return eos, eos if pad is None else pad


def _ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _reject(report: DataReport | None, ex, field: str, problem: str) -> None:
    """A row that cannot be encoded: raise naming file/line/field, or skip it (on_error)."""
    err = RowError(ex.where, problem, field)
    if report is None:
        raise err
    report.reject(err, ex.line)


def _render_chat(tokenizer, ex: SFTExample) -> tuple[str, str]:
    """(prompt, completion) text of a chat row: the tokenizer's template, or role: content."""
    history = [{"role": r, "content": c} for r, c in ex.messages[:-1]]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return prompt, ex.completion
    prompt = "".join(f"{r}: {c}\n" for r, c in ex.messages[:-1]) + "assistant: "
    return prompt, ex.completion


def encode_sft(
    examples: Sequence[SFTExample],
    tokenizer,
    max_len: int,
    report: DataReport | None = None,
    pack: bool = False,
) -> dict[str, np.ndarray]:
    """prompt + completion + EOS, right-padded to max_len.

    `loss_mask` is 1 on the completion tokens and the EOS (the targets), 0 on prompt and pad.
    With `pack`, consecutive examples share a row while they fit, and `segment_ids` (1, 2, ...
    per example, 0 on padding) keeps them from attending to each other.
    """
    eos, pad = special_ids(tokenizer)
    pairs = [
        _render_chat(tokenizer, e) if e.messages else (e.prompt, e.completion) for e in examples
    ]
    prompt_ids = _ids(tokenizer, [p for p, _ in pairs])
    completion_ids = _ids(tokenizer, [c for _, c in pairs])
    rows = []
    for ex, p, c in zip(examples, prompt_ids, completion_ids):
        if len(p) > max_len - 1:
            _reject(
                report,
                ex,
                "prompt",
                f"{len(p)} tokens, more than the maximum {max_len - 1} (max_len - 1)",
            )
            continue
        c = c + [eos]
        if len(p) + len(c) > max_len:
            c = c[: max_len - len(p)]
            if report is not None:
                report.truncated += 1
        rows.append((p, c))
    # Each packed row is a list of (prompt, completion) segments; unpacked, one per row.
    packed: list[list[tuple[list[int], list[int]]]] = []
    for p, c in rows:
        if (
            pack
            and packed
            and sum(len(a) + len(b) for a, b in packed[-1]) + len(p) + len(c) <= max_len
        ):
            packed[-1].append((p, c))
        else:
            packed.append([(p, c)])
    ids = np.full((len(packed), max_len), pad, np.int32)
    attention = np.zeros((len(packed), max_len), np.float32)
    loss = np.zeros((len(packed), max_len), np.float32)
    segments = np.zeros((len(packed), max_len), np.int32)
    for i, row in enumerate(packed):
        at = 0
        for seg, (p, c) in enumerate(row, start=1):
            ids[i, at : at + len(p) + len(c)] = p + c
            attention[i, at : at + len(p) + len(c)] = 1
            loss[i, at + len(p) : at + len(p) + len(c)] = 1
            segments[i, at : at + len(p) + len(c)] = seg
            at += len(p) + len(c)
    out = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}
    if pack:
        out["segment_ids"] = segments
    return out


def encode_prompts(
    examples: Sequence[PromptExample],
    tokenizer,
    max_prompt_len: int,
    report: DataReport | None = None,
) -> dict[str, np.ndarray]:
    """Prompts LEFT-padded to max_prompt_len, ready for generation."""
    _, pad = special_ids(tokenizer)
    kept = []
    for ex, p in zip(examples, _ids(tokenizer, [e.prompt for e in examples])):
        if len(p) > max_prompt_len:
            _reject(
                report, ex, "prompt", f"{len(p)} tokens, more than the maximum {max_prompt_len}"
            )
            continue
        kept.append(p)
    ids = np.full((len(kept), max_prompt_len), pad, np.int32)
    mask = np.zeros((len(kept), max_prompt_len), np.float32)
    for i, p in enumerate(kept):
        ids[i, max_prompt_len - len(p) :] = p
        mask[i, max_prompt_len - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def encode_rankings(
    examples: Sequence[RankingExample],
    tokenizer,
    max_prompt_len: int,
    max_completion_len: int,
    k_max: int | None = None,
    report: DataReport | None = None,
) -> dict[str, np.ndarray]:
    """[N, K, L] rows of prompt + completion + EOS (right-padded, L = P + C + 1), so the
    reward is read at the EOS; `completion_mask` [N, K] marks real completions, `rank` [N, K]
    their ranks (0 best; padded slots get K)."""
    eos, pad = special_ids(tokenizer)
    k_max = k_max or max(len(e.completions) for e in examples)
    length = max_prompt_len + max_completion_len + 1
    prompt_ids = _ids(tokenizer, [e.prompt for e in examples])
    rows = []
    for ex, p in zip(examples, prompt_ids):
        if len(p) > max_prompt_len:
            _reject(
                report, ex, "prompt", f"{len(p)} tokens, more than the maximum {max_prompt_len}"
            )
            continue
        if len(ex.completions) > k_max:
            _reject(report, ex, "completions", f"K={len(ex.completions)} is more than {k_max}")
            continue
        completions = []
        for c in _ids(tokenizer, ex.completions):
            c = c + [eos]
            if len(c) > max_completion_len + 1:
                c = c[: max_completion_len + 1]
                if report is not None:
                    report.truncated += 1
            completions.append(c)
        rows.append((p, completions, ex.ranks))
    n = len(rows)
    ids = np.full((n, k_max, length), pad, np.int32)
    mask = np.zeros((n, k_max, length), np.float32)
    completion_mask = np.zeros((n, k_max), np.float32)
    rank = np.full((n, k_max), k_max, np.int32)
    for i, (p, completions, ranks) in enumerate(rows):
        for j, c in enumerate(completions):
            ids[i, j, : len(p) + len(c)] = p + c
            mask[i, j, : len(p) + len(c)] = 1
        completion_mask[i, : len(completions)] = 1
        rank[i, : len(ranks)] = ranks
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": completion_mask,
        "rank": rank,
    }


def encode_texts(
    examples: Sequence[TextExample], tokenizer, max_len: int, report: DataReport | None = None
) -> dict[str, np.ndarray]:
    """text + EOS right-padded to max_len; longer texts are truncated (and counted)."""
    eos, pad = special_ids(tokenizer)
    ids_list = [t + [eos] for t in _ids(tokenizer, [e.text for e in examples])]
    ids = np.full((len(ids_list), max_len), pad, np.int32)
    mask = np.zeros((len(ids_list), max_len), np.float32)
    for i, t in enumerate(ids_list):
        if len(t) > max_len:
            t = t[:max_len]
            if report is not None:
                report.truncated += 1
        ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> Iterator[dict]:
    """Endless batches of rows; a fresh shuffle every epoch (seeded by seed and epoch)."""
    n = next(iter(arrays.values())).shape[0]
    if n < batch_size:
        raise RlhfJaxError(f"only {n} rows of data for a batch size of {batch_size}")
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield {k: v[idx] for k, v in arrays.items()}
        epoch += 1
