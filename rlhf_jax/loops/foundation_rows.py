"""Which rows of the pipeline's files each process encodes (`rlhf-jax pipeline` on several
processes), by the standalone commands' rules (loops/process_rows.py):

- trained on (pretraining text for pretrain and for ptx, demonstrations for SFT, RL prompts):
  the rows this process's slice of the stage's batches reads (`encode_own_rows`);
- evaluated row by row (the demonstrations the RM's bias is fitted on, the held-out text):
  every G-th row, G the number of batch slices (`encode_share`); each row's result is taken
  by its owner and gathered (loops/owned_rows.py);
- sampled in order (the evaluation prompts, `eval.n_samples` each): the rows this process's
  slice of the sampling batches reads (`OrderedShare`), the samples gathered.

The rankings are the RM stage's (`stage_rankings`, in loops/foundation.py). One process, or a
run whose other stages read every row (`rlhf-jax compare`: each row's own batches, DPO on every
ranking), encodes every row instead (loops/foundation.py's `_encode_all`).
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf_jax.config import Config
from rlhf_jax.data import DataReport
from rlhf_jax.loops.build_supervised import stage_batches
from rlhf_jax.loops.encoding import RunEncoder
from rlhf_jax.loops.evaluate import EVAL_BATCH
from rlhf_jax.loops.process_rows import OrderedShare, encode_own_rows, encode_share
from rlhf_jax.loops.rl import rl_batches
from rlhf_jax.loops.runtime import Runtime

File = tuple[Sequence, DataReport]  # a file's validated examples and its report


def encode_shares(
    cfg: Config, encode: RunEncoder, files: dict[str, File], runtime: Runtime
) -> tuple[dict, list[str]]:
    """`(arrays, prompt texts)`: the foundation's arrays (`_Data.arrays`' keys, plus
    "pretrain" for the built-in task's base model) with only this process's rows.
    files: "sft", "prompts", "ptx", "heldout", "eval" -> (examples, report)."""
    sft, sft_report = files["sft"]
    prompts, prompt_report = files["prompts"]
    ptx, ptx_report = files["ptx"]
    rl = rl_batches(cfg)

    def texts(max_len: int):
        return lambda examples, report: encode.lm_texts(examples, max_len, report)

    def throwaway(report: DataReport, what: str) -> DataReport:
        # a second encoding of a file whose counts the first one reports
        return DataReport(path=f"{report.path} ({what})")

    arrays: dict = {"ptx": None}
    if cfg.model.path is None:  # the built-in task's base model is pretrained on ptx.data
        batches = stage_batches(cfg, "pretrain")
        arrays["pretrain"] = encode_own_rows(
            ptx, texts(cfg.pretrain.max_len), throwaway(ptx_report, "pretrain"), batches, runtime
        )
    if cfg.sft.pack:  # which demonstrations share a packed row is known only once packed
        arrays["sft"] = encode.sft(sft, sft_report, pack=True)
    else:
        batches = stage_batches(cfg, "sft")
        arrays["sft"] = encode_own_rows(sft, encode.sft, sft_report, batches, runtime)
    # one demonstration per row, each scored by its owner for the RM's bias
    arrays["demo"] = encode_share(sft, encode.sft, throwaway(sft_report, "RM bias"), runtime)
    arrays["prompts"] = encode_own_rows(
        prompts, encode.prompts, prompt_report, rl["prompts"], runtime
    )
    if cfg.ptx.coef > 0:
        ptx_texts = texts(cfg.ptx.max_len)
        arrays["ptx"] = encode_own_rows(ptx, ptx_texts, ptx_report, rl["ptx"], runtime)
    heldout, heldout_report = files["heldout"]
    arrays["heldout"] = encode_share(heldout, texts(cfg.ptx.max_len), heldout_report, runtime)
    evals, eval_report = files["eval"]
    arrays["eval"] = OrderedShare(evals, encode.prompts, eval_report.path, EVAL_BATCH, runtime)
    # under data.on_error=raise every prompt row is kept: the texts are the file's rows
    return arrays, [e.text() for e in prompts]
