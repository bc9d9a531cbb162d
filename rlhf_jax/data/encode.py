"""Tokenise validated examples into fixed-shape NumPy arrays (int32 ids, float32 masks).

Conventions shared by every encoder:

- Masks come from token counts, never from comparing ids with the pad id, so a tokenizer whose
  pad token equals its EOS is handled. Without a pad token, pad = EOS (`special_ids`); padded
  positions are then EOS ids with mask 0. A tokenizer without an EOS token is an error.
- Prompts and texts start with the special tokens the tokenizer itself puts at the start of a
  sequence (e.g. Llama's BOS; nothing for GPT-2 or the built-in tokenizer); trailing special
  tokens a tokenizer would add (e.g. an EOS) are not taken. A prompt rendered by a chat template
  is tokenized as is (the template writes its own BOS). Completions get no special tokens.
- Prompt and completion are tokenized separately and concatenated, so the prompt/completion
  boundary is exact. EOS (`tokenizer.eos_token_id`, also after a chat template) ends every
  complete completion and text.
- A prompt longer than its budget is an error naming file, line and field (prompts are never
  cut); with a report in on_error="skip" mode the row is skipped and recorded instead.
- A completion or text longer than its budget is truncated at the end and its EOS dropped (EOS
  marks a text that is complete); each truncated completion / text, including one that fits
  exactly but leaves no room for its EOS, adds 1 to `report.truncated`. Texts are truncated,
  not split into chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax.data.jsonl import RowError
from rlhf_jax.data.load import DataReport
from rlhf_jax.data.records import PromptExample, RankingExample, SFTExample, TextExample
from rlhf_jax.errors import RlhfJaxError


def special_ids(tokenizer) -> tuple[int, int]:
    """`(eos, pad)` ids; pad falls back to EOS when the tokenizer has none (masks never look at
    ids, so this is safe here; a sampler must still stop on EOS only where the mask is 1)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RlhfJaxError("the tokenizer has no EOS token; set `eos_token` before training")
    pad = tokenizer.pad_token_id
    return int(eos), int(eos if pad is None else pad)


def _ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _start_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a sequence's text (BOS), found by comparing
    an encoding with and without special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def _start_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    start = _start_tokens(tokenizer) if texts else []
    return [start + ids for ids in _ids(tokenizer, texts)]


def _check_len(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RlhfJaxError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_some(examples: Sequence, what: str) -> None:
    if len(examples) == 0:
        raise RlhfJaxError(f"no {what} to encode")


def _reject(report: DataReport | None, ex, field: str, problem: str) -> None:
    """A row that cannot be encoded: raise naming file/line/field, or skip it (on_error)."""
    err = RowError(ex.where, problem, field)
    if report is None:
        raise err
    report.reject(err, ex.line)


def _count_truncated(report: DataReport | None, n: int = 1) -> None:
    if report is not None:
        report.truncated += n


def _distinct(seqs: list[list[int]], report: DataReport | None) -> list[int]:
    """Indices of the sequences identical to no other one: completions that truncation made
    equal are all left out (counted), since no ranking between equal inputs can be learned."""
    counts: dict[tuple[int, ...], int] = {}
    for seq in seqs:
        counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
    kept = [j for j, seq in enumerate(seqs) if counts[tuple(seq)] == 1]
    if report is not None:
        report.identical += len(seqs) - len(kept)
    return kept


def _none_left(report: DataReport | None, rows: list) -> None:
    if not rows:
        detail = report.summary() if report is not None else "no rows"
        raise RlhfJaxError(f"every row was skipped while encoding ({detail})")


def _prompt_ids(
    tokenizer, examples: Sequence, histories: Sequence, report, chat_template: bool = False
) -> list[list[int] | None]:
    """Prompt ids of `examples` (anything with `.prompt`): a chat history (((role, content),
    ...) or None per example) goes through the tokenizer's chat template when it has one
    (`add_generation_prompt=True`), else the plain rendering already in `example.prompt`. With
    `chat_template` (config `data.chat_template`) a plain prompt is one user message and takes
    the template too, so that every stage sees prompts in the format chat SFT trained on.
    None where the template failed and the row was skipped."""
    template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not template:
        raise RlhfJaxError(
            "config key 'data.chat_template' is true, but the tokenizer has no chat template "
            "(no 'chat_template' in its tokenizer_config.json)"
        )
    if chat_template:
        histories = [h or (("user", e.prompt),) for e, h in zip(examples, histories)]
    out: list[list[int] | None] = [None] * len(examples)
    plain = [i for i, h in enumerate(histories) if not (template and h)]
    for i, ids in zip(plain, _start_ids(tokenizer, [examples[i].prompt for i in plain])):
        out[i] = ids
    for i, (ex, history) in enumerate(zip(examples, histories)):
        if out[i] is not None:
            continue
        messages = [{"role": r, "content": c} for r, c in history]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # a template's own raise_exception(...), any Jinja error
            field = "messages" if getattr(ex, "messages", None) else "prompt"
            _reject(report, ex, field, f"the tokenizer's chat template failed: {e}")
            continue
        out[i] = _ids(tokenizer, [text])[0]
    return out


def encode_sft(
    examples: Sequence[SFTExample],
    tokenizer,
    max_len: int,
    report: DataReport | None = None,
    pack: bool = False,
    chat_template: bool = False,
) -> dict[str, np.ndarray]:
    """Demonstrations -> `input_ids, attention_mask, loss_mask` [N, max_len] (+ `segment_ids`).

    Each example is prompt + completion + EOS, right-padded. `loss_mask` is 1 on the completion
    tokens and the EOS (the targets of next-token prediction), 0 on prompt and padding. A prompt
    longer than max_len - 1 (no room for a single target) is an error; a completion that does
    not fit is truncated, EOS dropped, and counted.

    With `pack`, consecutive examples share a row while they fit (greedy, in order) and
    `segment_ids` [N, max_len] numbers them 1, 2, ... within the row (0 on padding) so the
    model can keep them from attending to each other; N is then the number of packed rows.
    """
    _check_len("max_len", max_len, 2)
    _check_some(examples, "SFT examples")
    eos, pad = special_ids(tokenizer)
    histories = [e.messages[:-1] if e.messages else None for e in examples]
    prompts = _prompt_ids(tokenizer, examples, histories, report, chat_template)
    completions = _ids(tokenizer, [e.completion for e in examples])
    rows: list[tuple[list[int], list[int]]] = []
    for ex, p, c in zip(examples, prompts, completions):
        if p is None:  # chat template failed, row skipped
            continue
        if len(p) > max_len - 1:
            field = "messages" if ex.messages else "prompt"
            _reject(
                report,
                ex,
                field,
                f"prompt is {len(p)} tokens; max_len {max_len} leaves room for at most "
                f"{max_len - 1} (prompts are never truncated)",
            )
            continue
        if len(p) + len(c) + 1 > max_len:  # no room for the EOS: cut, and no EOS
            c = c[: max_len - len(p)]
            _count_truncated(report)
        else:
            c = c + [eos]
        rows.append((p, c))
    _none_left(report, rows)
    packed: list[list[tuple[list[int], list[int]]]] = []
    used = 0
    for p, c in rows:
        if pack and packed and used + len(p) + len(c) <= max_len:
            packed[-1].append((p, c))
            used += len(p) + len(c)
        else:
            packed.append([(p, c)])
            used = len(p) + len(c)
    n = len(packed)
    ids = np.full((n, max_len), pad, np.int32)
    attention = np.zeros((n, max_len), np.float32)
    loss = np.zeros((n, max_len), np.float32)
    segments = np.zeros((n, max_len), np.int32)
    for i, row in enumerate(packed):
        at = 0
        for seg, (p, c) in enumerate(row, start=1):
            end = at + len(p) + len(c)
            ids[i, at:end] = p + c
            attention[i, at:end] = 1
            loss[i, at + len(p) : end] = 1
            segments[i, at:end] = seg
            at = end
    out = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}
    if pack:
        out["segment_ids"] = segments
    return out


def _reject_long_prompt(report: DataReport | None, ex, n_tokens: int, limit: int) -> None:
    _reject(
        report,
        ex,
        "prompt",
        f"prompt is {n_tokens} tokens, more than max_prompt_len {limit} "
        "(prompts are never truncated)",
    )


def encode_prompts(
    examples: Sequence[PromptExample],
    tokenizer,
    max_prompt_len: int,
    report: DataReport | None = None,
    chat_template: bool = False,
) -> dict[str, np.ndarray]:
    """Prompts -> `input_ids, attention_mask` [N, max_prompt_len], LEFT-padded for generation
    (the last prompt token sits in the last column). Chat rows (and, with `chat_template`,
    plain ones) are rendered by the tokenizer's chat template with the generation prompt. A
    longer prompt is an error."""
    return encode_prompt_rows(examples, tokenizer, max_prompt_len, report, chat_template)[0]


def encode_prompt_rows(
    examples: Sequence[PromptExample],
    tokenizer,
    max_prompt_len: int,
    report: DataReport | None = None,
    chat_template: bool = False,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """`encode_prompts` and, for each encoded row, the index of the example it came from (a
    row skipped for a failing template or a long prompt under `data.on_error=skip` has none):
    what a reward function needs to receive each prompt as the data file wrote it."""
    _check_len("max_prompt_len", max_prompt_len, 1)
    _check_some(examples, "prompts")
    _, pad = special_ids(tokenizer)
    histories = [e.messages for e in examples]
    kept, rows = [], []
    prompt_ids = _prompt_ids(tokenizer, examples, histories, report, chat_template)
    for i, (ex, p) in enumerate(zip(examples, prompt_ids)):
        if p is None:  # chat template failed, row skipped
            continue
        if len(p) > max_prompt_len:
            _reject_long_prompt(report, ex, len(p), max_prompt_len)
            continue
        kept.append(p)
        rows.append(i)
    _none_left(report, kept)
    ids = np.full((len(kept), max_prompt_len), pad, np.int32)
    mask = np.zeros((len(kept), max_prompt_len), np.float32)
    for i, p in enumerate(kept):
        ids[i, max_prompt_len - len(p) :] = p
        mask[i, max_prompt_len - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}, rows


def encode_rankings(
    examples: Sequence[RankingExample],
    tokenizer,
    max_prompt_len: int,
    max_completion_len: int,
    k_max: int | None = None,
    report: DataReport | None = None,
    chat_template: bool = False,
) -> dict[str, np.ndarray]:
    """Rankings -> `input_ids, attention_mask` [N, K, L], `completion_mask, rank` [N, K],
    `completion_start` [N] (the prompt's token count: where every completion of row n begins).

    L = max_prompt_len + max_completion_len + 1 and K = k_max (default: the largest K of the
    examples). Row [n, k] is prompt + completion k + EOS, right-padded; the reward is read at
    the last real token that is not the pad id (the EOS of a complete completion, or with pad
    == EOS the token before it, as transformers reads it). A completion longer than
    max_completion_len tokens keeps its first max_completion_len tokens and no EOS (counted).
    `rank[n, k]` is completion k's rank (0 best, ties equal); padded slots (completion_mask 0)
    are all padding with attention_mask 0 and rank K. Completions that truncation made
    identical to another of their prompt are left out (and counted in the report). A prompt
    longer than max_prompt_len, or a row with more than k_max completions, is an error.
    """
    _check_len("max_prompt_len", max_prompt_len, 1)
    _check_len("max_completion_len", max_completion_len, 1)
    _check_some(examples, "rankings")
    eos, pad = special_ids(tokenizer)
    k = max(len(e.completions) for e in examples) if k_max is None else k_max
    _check_len("k_max", k, 2)
    length = max_prompt_len + max_completion_len + 1
    prompt_ids = _prompt_ids(tokenizer, examples, [None] * len(examples), report, chat_template)
    flat = _ids(tokenizer, [c for e in examples for c in e.completions])
    rows = []
    at = 0
    for ex, p in zip(examples, prompt_ids):
        cs, at = flat[at : at + len(ex.completions)], at + len(ex.completions)
        if p is None:  # chat template failed, row skipped
            continue
        if len(p) > max_prompt_len:
            _reject_long_prompt(report, ex, len(p), max_prompt_len)
            continue
        if len(cs) > k:
            _reject(report, ex, "completions", f"K = {len(cs)} completions, more than k_max {k}")
            continue
        completions = []
        for c in cs:
            if len(c) > max_completion_len:
                c = c[:max_completion_len]
                _count_truncated(report)
            else:
                c = c + [eos]
            completions.append(p + c)
        kept = _distinct(completions, report)
        rows.append(([completions[j] for j in kept], [ex.ranks[j] for j in kept], len(p)))
    _none_left(report, rows)
    n = len(rows)
    ids = np.full((n, k, length), pad, np.int32)
    mask = np.zeros((n, k, length), np.float32)
    completion_mask = np.zeros((n, k), np.float32)
    rank = np.full((n, k), k, np.int32)
    completion_start = np.zeros((n,), np.int32)
    for i, (seqs, ranks, prompt_len) in enumerate(rows):
        completion_start[i] = prompt_len
        for j, seq in enumerate(seqs):
            ids[i, j, : len(seq)] = seq
            mask[i, j, : len(seq)] = 1
        completion_mask[i, : len(seqs)] = 1
        rank[i, : len(ranks)] = ranks
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": completion_mask,
        "rank": rank,
        "completion_start": completion_start,
    }


def encode_texts(
    examples: Sequence[TextExample], tokenizer, max_len: int, report: DataReport | None = None
) -> dict[str, np.ndarray]:
    """Texts -> `input_ids, attention_mask` [N, max_len]: text + EOS, right-padded. A longer
    text keeps its first max_len tokens, no EOS, and is counted (texts are not chunked)."""
    _check_len("max_len", max_len, 1)
    _check_some(examples, "texts")
    eos, pad = special_ids(tokenizer)
    seqs = _start_ids(tokenizer, [e.text for e in examples])
    ids = np.full((len(seqs), max_len), pad, np.int32)
    mask = np.zeros((len(seqs), max_len), np.float32)
    for i, t in enumerate(seqs):
        if len(t) + 1 > max_len:
            t = t[:max_len]
            _count_truncated(report)
        else:
            t = t + [eos]
        ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    return {"input_ids": ids, "attention_mask": mask}
