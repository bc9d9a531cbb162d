"""The data encoders with a run's settings bound (lengths, the chat template), so that the
pipeline and the stage commands encode every file type the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.data import (
    DataReport,
    encode_prompt_rows,
    encode_prompts,
    encode_rankings,
    encode_sft,
    encode_texts,
)


@dataclasses.dataclass(frozen=True)
class RunEncoder:
    cfg: Config
    tokenizer: Any

    @property
    def _chat(self) -> bool:
        return self.cfg.data.chat_template

    def sft(self, examples: Sequence, report: DataReport | None = None, pack: bool = False):
        """Demonstrations at `sft.max_len` (`pack`: several per row)."""
        return encode_sft(
            examples, self.tokenizer, self.cfg.sft.max_len, report, pack, chat_template=self._chat
        )

    def prompts(
        self, examples: Sequence, report: DataReport | None = None, max_len: int | None = None
    ):
        """Prompts, left-padded to `max_len` (default `ppo.max_prompt_len`)."""
        n = self.cfg.ppo.max_prompt_len if max_len is None else max_len
        return encode_prompts(examples, self.tokenizer, n, report, chat_template=self._chat)

    def rl_prompts(
        self, examples: Sequence, report: DataReport | None = None
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """RL prompts at `ppo.max_prompt_len`, with each encoded row's prompt as the data file
        wrote it (a chat row's messages as `role: content` lines) and carrying its extra fields
        (`PromptText`), for a reward function."""
        arrays, rows = encode_prompt_rows(
            examples, self.tokenizer, self.cfg.ppo.max_prompt_len, report, self._chat
        )
        return arrays, [examples[i].text() for i in rows]

    def rankings(
        self,
        examples: Sequence,
        report: DataReport | None = None,
        section: str = "rm",
        k_max: int | None = None,
    ):
        """Rankings at the lengths of the `section` that trains on them ("rm" or "dpo");
        `k_max`: completions per row (default: the most of `examples`)."""
        lengths = getattr(self.cfg, section)
        return encode_rankings(
            examples,
            self.tokenizer,
            lengths.max_prompt_len,
            lengths.max_completion_len,
            k_max=k_max,
            report=report,
            chat_template=self._chat,
        )

    def lm_texts(self, examples: Sequence, max_len: int, report: DataReport | None = None):
        """Plain text as a language-modelling batch: every real token is a target."""
        enc = encode_texts(examples, self.tokenizer, max_len, report)
        return {**enc, "loss_mask": enc["attention_mask"].astype(np.float32)}
