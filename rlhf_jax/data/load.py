"""Read a whole JSONL file up front and validate every row, before anything is compiled.

`load_sft / load_rankings / load_prompts / load_texts(path, on_error="raise")` return
`(examples, DataReport)`. With `on_error="raise"` (the default) the first bad row raises an
`RlhfJaxError` naming file, line and field. With `on_error="skip"` every bad row is left out
and recorded in `report.skipped` as `(line, reason)`, and the encoders given the same report
skip (and record) rows whose prompt is too long for the token budget, so the run's summary
says how many rows were dropped and why. A file with no rows, or whose every row is bad, is
an error in both modes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from rlhf_jax.data.jsonl import RowError, read_jsonl
from rlhf_jax.data.records import (
    MAX_K,
    PromptExample,
    RankingExample,
    SFTExample,
    TextExample,
    parse_prompt_row,
    parse_ranking_row,
    parse_sft_row,
    parse_text_row,
)
from rlhf_jax.errors import RlhfJaxError

OnError = Literal["raise", "skip"]
_SHOWN = 3  # skipped rows quoted in a summary


@dataclasses.dataclass
class DataReport:
    """What happened to one file's rows.

    rows: examples kept (loaded, minus rows an encoder skipped).
    skipped: `(line, reason)` of every row left out (only with on_error="skip").
    truncated: completions / texts cut to their maximum token length, counted by the encoders
        (per text: a ranking row with 3 long completions counts 3; encoding the same examples
        twice with the same report counts them twice).
    identical: ranked completions left out because, cut to their maximum length, they became
        identical to another completion of the same prompt (one input cannot be ranked both
        above and below another: the pair would contradict itself).
    """

    path: str
    rows: int = 0
    skipped: list[tuple[int | None, str]] = dataclasses.field(default_factory=list)
    truncated: int = 0
    identical: int = 0
    on_error: OnError = "raise"

    def reject(self, err: RowError, line: int | None) -> None:
        """Raise `err`, or record its row as skipped, according to `on_error`."""
        if self.on_error != "skip":
            raise err
        self.skipped.append((line, err.reason))
        self.rows -= 1

    def to_dict(self, max_rows: int = 50) -> dict:
        """For report.json / summary.json: counts, and the first `max_rows` skipped rows."""
        return {
            "path": self.path,
            "rows": self.rows,
            "skipped": len(self.skipped),
            "skipped_rows": [{"line": ln, "reason": r} for ln, r in self.skipped[:max_rows]],
            "truncated": self.truncated,
            "identical_after_truncation": self.identical,
        }

    def summary(self) -> str:
        """One line: `sft.jsonl: 97 rows, 3 skipped (line 4: field 'prompt': ...), 5 truncated`."""
        text = f"{self.path}: {self.rows} rows"
        if self.skipped:
            shown = "; ".join(f"line {line}: {reason}" for line, reason in self.skipped[:_SHOWN])
            more = len(self.skipped) - _SHOWN
            shown += f"; +{more} more" if more > 0 else ""
            text += f", {len(self.skipped)} skipped ({shown})"
        text += f", {self.truncated} truncated"
        if self.identical:
            text += (
                f", {self.identical} completions left out as identical to another of their "
                "prompt after truncation (raise the length limit to keep them)"
            )
        return text


def load_rows(
    path: str | Path, parse: Callable[..., Any], on_error: OnError = "raise"
) -> tuple[list[Any], DataReport]:
    """Parse every row of `path` with `parse(row, path, line)` (raising RowError on a bad row)."""
    if on_error not in ("raise", "skip"):
        raise RlhfJaxError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    name = str(path)
    report = DataReport(name, on_error=on_error)
    skipped = report.skipped if on_error == "skip" else None
    examples = []
    for line, row in read_jsonl(path, skipped):
        try:
            examples.append(parse(row, name, line))
        except RowError as e:
            if skipped is None:
                raise
            skipped.append((line, e.reason))
    if not examples:
        raise RlhfJaxError(f"{name}: no valid rows ({report.summary()})")
    report.rows = len(examples)
    return examples, report


def load_sft(path: str | Path, on_error: OnError = "raise") -> tuple[list[SFTExample], DataReport]:
    """`{"prompt", "completion"}` or `{"messages": [...]}` rows (see records.py)."""
    return load_rows(path, parse_sft_row, on_error)


def load_rankings(
    path: str | Path, on_error: OnError = "raise", allow_ties: bool = False, max_k: int = MAX_K
) -> tuple[list[RankingExample], DataReport]:
    """K-wise `{"prompt", "completions", "ranking"}` (or `"ranks"` with allow_ties) or
    pairwise `{"prompt", "chosen", "rejected"}` rows; 2 <= K <= max_k (see records.py)."""
    parse = functools.partial(parse_ranking_row, allow_ties=allow_ties, max_k=max_k)
    return load_rows(path, parse, on_error)


def load_prompts(
    path: str | Path, on_error: OnError = "raise"
) -> tuple[list[PromptExample], DataReport]:
    """`{"prompt"}` rows (PPO)."""
    return load_rows(path, parse_prompt_row, on_error)


def load_texts(
    path: str | Path, on_error: OnError = "raise"
) -> tuple[list[TextExample], DataReport]:
    """`{"text"}` rows (pretraining mix)."""
    return load_rows(path, parse_text_row, on_error)
