"""GSM8K in its public layout to the project's files:

    python -m rlhf_jax.tasks.gsm8k IN OUT

IN: GSM8K rows `{"question": ..., "answer": "...reasoning...\\n#### 72"}`, as JSONL or (with
pyarrow installed) parquet. OUT: a folder with
- `prompts.jsonl`: `{"prompt": question + instruction, "answer": "72"}` (`ppo.prompts`, and
  `rlhf-jax eval --data`; the `answer` field reaches the `gsm8k_*` reward functions),
- `sft.jsonl`: `{"prompt": ..., "completion": the worked solution}` (`sft.data`).

Every bad row stops the conversion with `IN:LINE: field 'name': problem` (exit code 2).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from rlhf_jax.data.jsonl import RowError, read_jsonl
from rlhf_jax.errors import RlhfJaxError

# The instruction verl appends to every GSM8K question, after one space
# (volcengine/verl, examples/data_preprocess/gsm8k.py, `instruction_following`): the model is
# asked for the `#### N` line that the strict reward (verl's and `gsm8k_strict`) reads.
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'

# GSM8K's final-answer line: "#### " then the number (verl's extraction pattern too); commas
# are thousands separators ("#### 1,200" is 1200).
_FINAL = re.compile(r"#### (-?[0-9.,]*[0-9][0-9.,]*)")
# GSM8K's calculator annotations, "<<48/2=24>>": tool calls the dataset's authors used, not
# text a model should learn to write, so the SFT completions leave them out.
_CALC = re.compile(r"<<[^<>]*>>")


def prompt_text(question: str) -> str:
    return f"{question.strip()} {INSTRUCTION}"


def final_answer(solution: str) -> str | None:
    """The number of the solution's last `#### N`, commas removed; None when there is none."""
    found = _FINAL.findall(solution)
    return found[-1].replace(",", "") if found else None


def convert_row(row: dict, where: str) -> tuple[dict, dict]:
    """One GSM8K row to its (prompt row, SFT row); `where` is `IN:LINE` for errors."""
    text = {}
    for key in ("question", "answer"):
        value = row.get(key)
        if value is None:
            raise RowError(where, "missing (a GSM8K row has 'question' and 'answer')", key)
        if not isinstance(value, str) or not value.strip():
            raise RowError(where, f"expected a non-empty string, got {value!r:.60}", key)
        text[key] = value
    number = final_answer(text["answer"])
    if number is None:
        raise RowError(where, "no final answer line '#### N' in the solution", "answer")
    prompt = prompt_text(text["question"])
    completion = _CALC.sub("", text["answer"]).strip()
    return {"prompt": prompt, "answer": number}, {"prompt": prompt, "completion": completion}


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RlhfJaxError(
            f"{path}: reading parquet needs pyarrow (pip install pyarrow), or give the JSONL "
            "version of the file"
        ) from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise RlhfJaxError(f"{path}: not a readable parquet file ({e})") from None
    # parquet has no lines: rows are numbered from 1, as a JSONL file's would be
    yield from enumerate(table.to_pylist(), start=1)


def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(row number, row) of a GSM8K file: parquet by its suffix, JSONL otherwise."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    return read_jsonl(path)


def convert(src: str | Path, out: str | Path) -> int:
    """Convert `src` into OUT/prompts.jsonl and OUT/sft.jsonl; returns the row count. Nothing
    is written when any row is bad."""
    prompts, sft = [], []
    for line, row in read_rows(src):
        p, s = convert_row(row, f"{src}:{line}")
        prompts.append(p)
        sft.append(s)
    if not prompts:
        raise RlhfJaxError(f"{src}: no rows")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RlhfJaxError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("prompts.jsonl", prompts), ("sft.jsonl", sft)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / name).write_text(text, encoding="utf-8")
    return len(prompts)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0].startswith("-"):
        print(
            "usage: python -m rlhf_jax.tasks.gsm8k IN(.jsonl|.parquet) OUT_FOLDER", file=sys.stderr
        )
        return 2
    try:
        n = convert(args[0], args[1])
    except RlhfJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args[1])
    print(f"{n} rows: {out / 'prompts.jsonl'} (prompt, answer), {out / 'sft.jsonl'} (SFT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
