"""User data: JSONL formats, validation with file/line/field errors, fixed-shape encoding.

Pipeline: `load_*(path)` reads and validates a whole file up front -> `(examples, DataReport)`;
`encode_*(examples, tokenizer, ...)` -> dict of fixed-shape NumPy arrays; `batches(arrays, ...)`
-> deterministic, resumable shuffled batches. Formats and their field semantics: records.py;
reading and errors: jsonl.py, load.py; tokenisation conventions: encode.py.
"""

from rlhf_jax.data.batching import (
    Batches,
    batches,
    heldout_rows,
    heldout_split,
    split_heldout,
)
from rlhf_jax.data.encode import (
    encode_prompt_rows,
    encode_prompts,
    encode_rankings,
    encode_sft,
    encode_texts,
    special_ids,
)
from rlhf_jax.data.jsonl import RowError, read_jsonl
from rlhf_jax.data.load import (
    DataReport,
    load_prompts,
    load_rankings,
    load_rows,
    load_sft,
    load_texts,
)
from rlhf_jax.data.pack import pack_rankings
from rlhf_jax.data.records import (
    MAX_K,
    MIN_K,
    PromptExample,
    RankingExample,
    SFTExample,
    TextExample,
    parse_prompt_row,
    parse_ranking_row,
    parse_sft_row,
    parse_text_row,
)

__all__ = [
    "pack_rankings",
    "MAX_K",
    "MIN_K",
    "Batches",
    "DataReport",
    "PromptExample",
    "RankingExample",
    "RowError",
    "SFTExample",
    "TextExample",
    "batches",
    "heldout_rows",
    "heldout_split",
    "split_heldout",
    "encode_prompt_rows",
    "encode_prompts",
    "encode_rankings",
    "encode_sft",
    "encode_texts",
    "load_prompts",
    "load_rankings",
    "load_rows",
    "load_sft",
    "load_texts",
    "parse_prompt_row",
    "parse_ranking_row",
    "parse_sft_row",
    "parse_text_row",
    "read_jsonl",
    "special_ids",
]
