"""Property: whatever bytes or JSON a file holds, loaders raise only the project's own error."""

import contextlib
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_jax.data import load_prompts, load_rankings, load_sft, load_texts
from rlhf_jax.errors import RlhfJaxError

LOADERS = (load_sft, load_rankings, load_prompts, load_texts)
KEYS = [
    "prompt",
    "completion",
    "completions",
    "ranking",
    "ranks",
    "chosen",
    "rejected",
    "text",
    "messages",
    "role",
    "content",
    "extra",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=12,
)
rows = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load_all(path):
    for loader in LOADERS:
        for mode in ("raise", "skip"):
            with contextlib.suppress(RlhfJaxError):
                loader(path, on_error=mode)


@SETTINGS
@given(st.lists(rows, max_size=4))
def test_arbitrary_json_rows(tmp_path, data):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in data))
    _load_all(path)


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(data)
    _load_all(path)
