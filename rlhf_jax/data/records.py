"""The four row formats, as frozen dataclasses, and their validating parsers.

Formats (one JSON object per line; every field listed is required unless marked optional, and
any other field is an error naming it):

- SFT, plain:  `{"prompt": str, "completion": str}`
- SFT, chat:   `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`
  with at least two messages, the last one from the assistant. The completion is the last
  message's content. The prompt is rendered by the tokenizer's chat template at encoding time
  when it has one (`encode.py`); `SFTExample.prompt` holds the plain rendering
  `"role: content\\n"` per message followed by `"assistant: "`, used by tokenizers without a
  template.
- Rankings, K-wise: `{"prompt": str, "completions": [str] * K, "ranking": [int] * K}` with
  2 <= K <= 9 distinct completions; `ranking` lists completion INDICES FROM BEST TO WORST
  (a permutation of 0..K-1): `"ranking": [2, 0, 1]` means completion 2 is best, 1 is worst.
  With `allow_ties=True` a row may give instead `"ranks": [int] * K`, the RANK OF EACH
  COMPLETION (0 best; equal ranks are ties, which form no comparison), values in 0..K-1 and
  not all equal. `ranks` without `allow_ties`, both fields at once, or a `ties` field are errors.
- Rankings, pairwise: `{"prompt": str, "chosen": str, "rejected": str}`, the K = 2 case.
- Prompts (RL): `{"prompt": str}`, or chat `{"messages": [...]}` (roles as for SFT, at least
  one message, the last one the user's: the model writes the assistant's reply). A prompt row
  may carry extra fields whose values are JSON scalars (string, number, boolean), e.g. a
  reference answer `{"prompt": "...", "answer": "72"}`: they are kept (`PromptExample.fields`)
  and reach a reward function that names them (`rlhf_jax.rewards`). The fields of the other
  formats (`completion`, `chosen`, `text`, ...) stay errors: such a row is a file of another
  kind, not a prompt with extras.
  Pretraining text (ptx): `{"text": str}`.

Every string must be non-empty and not whitespace-only; strings are kept exactly as given.
Completions are distinct by exact string equality. Every parser raises `RowError`
(an `RlhfJaxError`) whose message reads `path:LINE: field 'ranking': not a permutation ...`.

Examples remember their `path` and `line` (excluded from equality) so that errors found later,
at encoding time (a prompt too long for the tokenizer budget), still name the line.
"""

from __future__ import annotations

import dataclasses
import json

from rlhf_jax.data.jsonl import RowError, json_type, location

MIN_K, MAX_K = 2, 9
ROLES = ("system", "user", "assistant")

_loc = dict(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """A demonstration. `messages` ((role, content), ...) is set for chat rows, else None."""

    prompt: str
    completion: str
    messages: tuple[tuple[str, str], ...] | None = None
    path: str | None = dataclasses.field(**_loc)
    line: int | None = dataclasses.field(**_loc)

    @property
    def where(self) -> str:
        """`path:LINE` of the row this example came from (for error messages)."""
        return location(self.path, self.line)


@dataclasses.dataclass(frozen=True)
class RankingExample:
    """K completions of one prompt; `ranks[i]` is the rank of completion i (0 best, ties equal)."""

    prompt: str
    completions: tuple[str, ...]
    ranks: tuple[int, ...]
    path: str | None = dataclasses.field(**_loc)
    line: int | None = dataclasses.field(**_loc)

    @property
    def where(self) -> str:
        """`path:LINE` of the row this example came from (for error messages)."""
        return location(self.path, self.line)

    @property
    def ranking(self) -> tuple[int, ...]:
        """Completion indices from best to worst (tied completions in index order)."""
        return tuple(sorted(range(len(self.ranks)), key=lambda i: (self.ranks[i], i)))


@dataclasses.dataclass(frozen=True)
class PromptExample:
    """An RL prompt. `messages` ((role, content), ...) is set for chat rows, else None; then
    `prompt` holds their plain rendering (used by tokenizers without a chat template)."""

    prompt: str
    messages: tuple[tuple[str, str], ...] | None = None
    path: str | None = dataclasses.field(**_loc)
    line: int | None = dataclasses.field(**_loc)
    # the row's extra scalar fields, in file order ({"answer": "72"}): for reward functions
    # (compared, not hashed: a dict is unhashable, and equal examples still hash alike)
    fields: dict[str, str | int | float | bool] = dataclasses.field(
        default_factory=dict, hash=False
    )

    @property
    def where(self) -> str:
        """`path:LINE` of the row this example came from (for error messages)."""
        return location(self.path, self.line)

    def text(self) -> PromptText:
        """The prompt as the data file wrote it, carrying the row's fields and location."""
        return PromptText(self.prompt, self.fields, self.where)


class PromptText(str):
    """A prompt's text (a `str`: what every consumer of the RL prompts reads) that also carries
    its row's extra fields and `path:LINE`. Kept on the string itself, not in a second list,
    so the fields follow the text through every batching, sharding and resume step unchanged
    and reach the reward function (`rlhf_jax.rewards.score_texts`) with it."""

    fields: dict[str, str | int | float | bool]
    where: str

    def __new__(cls, text: str, fields: dict | None = None, where: str = "") -> PromptText:
        self = super().__new__(cls, text)
        self.fields, self.where = dict(fields or {}), where
        return self

    def __reduce__(self):  # pickled (multi-process runs) with its fields
        return (PromptText, (str(self), self.fields, self.where))


# Fields of the other row formats: in a prompt row they mean the wrong file, not an extra.
_OTHER_FORMATS = ("completion", "completions", "chosen", "rejected", "ranking", "ranks", "text")


@dataclasses.dataclass(frozen=True)
class TextExample:
    text: str
    path: str | None = dataclasses.field(**_loc)
    line: int | None = dataclasses.field(**_loc)

    @property
    def where(self) -> str:
        """`path:LINE` of the row this example came from (for error messages)."""
        return location(self.path, self.line)


def render_plain(messages: tuple[tuple[str, str], ...]) -> str:
    """The chat rendering used without a chat template: `"role: content\\n"` per message,
    then `"assistant: "` as the generation prompt."""
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant: "


def _show(value: object, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields(
    row: dict,
    at: str,
    required: tuple[str, ...],
    hints: dict[str, str] | None = None,
    missing: bool = True,
):
    """Unknown fields first (a misspelt field then reads as unknown, not as missing)."""
    for key in row:
        if key not in required:
            hint = (hints or {}).get(key) or "expected " + ", ".join(repr(k) for k in required)
            raise RowError(at, f"unknown field ({hint})", key)
    for key in required:
        if missing and key not in row:
            raise RowError(at, "missing", key)


def _string(value: object, at: str, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(at, f"expected a string, got {json_type(value)}", field)
    if not value.strip():
        raise RowError(at, "empty or whitespace-only string", field)
    try:  # JSON escapes can spell half of a UTF-16 pair ("\ud800"): not text any tokenizer takes
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start : e.end].encode("unicode_escape").decode()
        raise RowError(at, f"an unpaired surrogate ({bad}) is not text", field) from None
    return value


def _int_list(value: object, at: str, field: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise RowError(at, f"expected an array of integers (got {_show(value)})", field)
    return value


def parse_sft_row(row: dict, path: str | None = None, line: int | None = None) -> SFTExample:
    """A plain or chat SFT row -> SFTExample (raises RowError)."""
    at = location(path, line)
    if "messages" not in row:
        _fields(row, at, ("prompt", "completion"), {"role": "a chat row has only 'messages'"})
        prompt = _string(row["prompt"], at, "prompt")
        completion = _string(row["completion"], at, "completion")
        return SFTExample(prompt, completion, None, path, line)
    _fields(row, at, ("messages",), {k: "a chat row has only 'messages'" for k in row})
    messages = _messages(row["messages"], at, 2, "a prompt and the assistant's reply")
    if messages[-1][0] != "assistant":
        raise RowError(
            at,
            f"the last message must be the assistant's (got {messages[-1][0]!r})",
            f"messages[{len(messages) - 1}].role",
        )
    return SFTExample(render_plain(messages[:-1]), messages[-1][1], messages, path, line)


def _messages(value: object, at: str, least: int, what: str) -> tuple[tuple[str, str], ...]:
    """A validated `messages` array: ((role, content), ...), at least `least` of them."""
    if not isinstance(value, list):
        raise RowError(at, f"expected an array of messages, got {json_type(value)}", "messages")
    if len(value) < least:
        raise RowError(at, f"need at least {least} messages ({what}), got {len(value)}", "messages")
    messages = []
    for i, msg in enumerate(value):
        name = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RowError(at, f"expected an object, got {json_type(msg)}", name)
        for key in msg:
            if key not in ("role", "content"):
                raise RowError(at, "unknown field (expected 'role', 'content')", f"{name}.{key}")
        for key in ("role", "content"):
            if key not in msg:
                raise RowError(at, "missing", f"{name}.{key}")
        role = msg["role"]
        if role not in ROLES:
            raise RowError(
                at, f"expected one of {', '.join(ROLES)} (got {_show(role)})", f"{name}.role"
            )
        messages.append((role, _string(msg["content"], at, f"{name}.content")))
    return tuple(messages)


def _completions(value: object, at: str, field: str, max_k: int) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise RowError(at, f"expected an array of strings, got {json_type(value)}", field)
    if not MIN_K <= len(value) <= max_k:
        raise RowError(at, f"need {MIN_K}..{max_k} completions, got K = {len(value)}", field)
    texts = tuple(_string(v, at, f"{field}[{i}]") for i, v in enumerate(value))
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text in first:
            raise RowError(at, f"completions {first[text]} and {i} are identical", field)
        first[text] = i
    return texts


def _ranks_from_ranking(value: object, k: int, at: str) -> tuple[int, ...]:
    ranking = _int_list(value, at, "ranking")
    if sorted(ranking) != list(range(k)):
        raise RowError(at, f"not a permutation of 0..{k - 1} (got {_show(ranking)})", "ranking")
    ranks = [0] * k
    for position, index in enumerate(ranking):
        ranks[index] = position
    return tuple(ranks)


def _ranks_with_ties(value: object, k: int, at: str) -> tuple[int, ...]:
    ranks = _int_list(value, at, "ranks")
    if len(ranks) != k:
        raise RowError(at, f"expected {k} ranks (one per completion), got {len(ranks)}", "ranks")
    if any(not 0 <= r < k for r in ranks):
        raise RowError(at, f"ranks must lie in 0..{k - 1} (got {_show(ranks)})", "ranks")
    if len(set(ranks)) < 2:
        raise RowError(at, f"all completions tie, nothing to compare (got {_show(ranks)})", "ranks")
    dense = {r: i for i, r in enumerate(sorted(set(ranks)))}  # [0, 2, 2] -> [0, 1, 1]
    return tuple(dense[r] for r in ranks)


def parse_ranking_row(
    row: dict,
    path: str | None = None,
    line: int | None = None,
    allow_ties: bool = False,
    max_k: int = MAX_K,
) -> RankingExample:
    """A K-wise or pairwise ranking row -> RankingExample (raises RowError)."""
    at = location(path, line)
    ties_hint = (
        "ties are given as 'ranks' (rank per completion, 0 best) with allow_ties"
        if not allow_ties
        else "give ties as 'ranks' (rank per completion, 0 best)"
    )
    if "completions" in row:
        order_field = "ranks" if allow_ties and "ranks" in row else "ranking"
        if allow_ties and "ranks" in row and "ranking" in row:
            raise RowError(at, "give either 'ranking' or 'ranks', not both", "ranks")
        hints = {"ties": ties_hint}
        if not allow_ties:
            hints["ranks"] = "'ranks' (ties) needs allow_ties; otherwise give 'ranking'"
        _fields(row, at, ("prompt", "completions", order_field), hints)
        prompt = _string(row["prompt"], at, "prompt")
        completions = _completions(row["completions"], at, "completions", max_k)
        if order_field == "ranks":
            ranks = _ranks_with_ties(row["ranks"], len(completions), at)
        else:
            ranks = _ranks_from_ranking(row["ranking"], len(completions), at)
        return RankingExample(prompt, completions, ranks, path, line)
    if "chosen" in row or "rejected" in row:
        _fields(row, at, ("prompt", "chosen", "rejected"), {"ties": ties_hint})
        prompt = _string(row["prompt"], at, "prompt")
        chosen = _string(row["chosen"], at, "chosen")
        rejected = _string(row["rejected"], at, "rejected")
        if chosen == rejected:
            raise RowError(at, "identical to 'chosen'", "rejected")
        return RankingExample(prompt, (chosen, rejected), (0, 1), path, line)
    known = ("prompt", "completions", "ranking", "chosen", "rejected")
    _fields(row, at, known, {"ties": ties_hint, "ranks": ties_hint}, missing=False)
    raise RowError(
        at,
        "missing (a ranking row has 'completions' + 'ranking', or 'chosen' + 'rejected')",
        "completions",
    )


def parse_prompt_row(row: dict, path: str | None = None, line: int | None = None) -> PromptExample:
    """A plain or chat prompt row -> PromptExample (raises RowError)."""
    at = location(path, line)
    fields = _extra_fields(row, at)
    if "messages" not in row:
        hints = {
            "role": "a chat row has only 'messages'",
            "content": "a chat row has only 'messages'",
        }
        _fields({k: v for k, v in row.items() if k not in fields}, at, ("prompt",), hints)
        return PromptExample(_string(row["prompt"], at, "prompt"), None, path, line, fields)
    chat = {k: v for k, v in row.items() if k not in fields}
    _fields(chat, at, ("messages",), {k: "a chat row has only 'messages'" for k in chat})
    messages = _messages(row["messages"], at, 1, "the user's prompt")
    if messages[-1][0] != "user":
        raise RowError(
            at,
            f"the last message must be the user's: the model writes the reply (got "
            f"{messages[-1][0]!r})",
            f"messages[{len(messages) - 1}].role",
        )
    return PromptExample(render_plain(messages), messages, path, line, fields)


def _extra_fields(row: dict, at: str) -> dict[str, str | int | float | bool]:
    """The prompt row's extra fields (all but prompt/messages and the names the other formats
    and chat messages use, which `_fields` then reports as unknown); each a JSON scalar."""
    reserved = ("prompt", "messages", "role", "content", *_OTHER_FORMATS)
    extra = {k: v for k, v in row.items() if k not in reserved}
    for key, value in extra.items():
        if value is None or isinstance(value, list | dict):
            raise RowError(
                at,
                f"an extra field of a prompt row is a JSON string, number or boolean (got "
                f"{json_type(value)})",
                key,
            )
    return extra


def parse_text_row(row: dict, path: str | None = None, line: int | None = None) -> TextExample:
    at = location(path, line)
    _fields(row, at, ("text",))
    return TextExample(_string(row["text"], at, "text"), path, line)
