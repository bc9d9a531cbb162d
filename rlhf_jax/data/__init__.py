"""User data: JSONL formats, validation with file/line/field errors, fixed-shape encoding."""

from rlhf_jax.data.encode import (
    batches,
    encode_prompts,
    encode_rankings,
    encode_sft,
    encode_texts,
    special_ids,
)
from rlhf_jax.data.load import (
    DataReport,
    load_prompts,
    load_rankings,
    load_rows,
    load_sft,
    load_texts,
)
from rlhf_jax.data.records import (
    PromptExample,
    RankingExample,
    RowError,
    SFTExample,
    TextExample,
)

__all__ = [
    "DataReport",
    "PromptExample",
    "RankingExample",
    "RowError",
    "SFTExample",
    "TextExample",
    "batches",
    "encode_prompts",
    "encode_rankings",
    "encode_sft",
    "encode_texts",
    "load_prompts",
    "load_rankings",
    "load_rows",
    "load_sft",
    "load_texts",
    "special_ids",
]
