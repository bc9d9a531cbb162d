"""The docs' lists of the batch keys each part receives are those `contract.keys` declares:
docs/losses.md's generated table, algorithms.md's policy-loss table, and its sentences on
what an estimator and a rollout filter see."""

import re
from pathlib import Path

from rlhf_jax.contract.keys import BATCH_KEYS, markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs"
EVERY_KEY = {k for part in BATCH_KEYS.values() for k in part.every_key()}


def test_the_losses_page_holds_the_generated_table():
    text = (DOCS / "losses.md").read_text()
    start = "<!-- generated: rlhf_jax.contract.keys.markdown_table() -->\n"
    block = text[text.index(start) + len(start) : text.index("\n<!-- end generated -->")]
    assert block == markdown_table(), "regenerate it with contract.keys.markdown_table()"


def _ticked(text: str) -> set[str]:
    return set(re.findall(r"`(\w+)`", text)) | set(re.findall(r'batch\["(\w+)"\]', text))


def test_the_policy_table_of_algorithms_md():
    text = (DOCS / "algorithms.md").read_text()
    table = text[text.index("| key | shape | when |") :].split("\n\n")[0].splitlines()[2:]
    by_when = {"always": set(), "reference": set(), "critic": set()}
    for row in table:
        keys, _, when = (cell.strip() for cell in row.strip("|").split("|"))
        name = "reference" if "KL" in when else "critic" if "critic" in when else "always"
        assert name != "always" or when.startswith("always"), row
        by_when[name] |= _ticked(keys)
    policy = BATCH_KEYS["policy"]
    assert by_when["always"] == set(policy.always)
    assert by_when["reference"] == set(policy.when["reference"][0])
    assert by_when["critic"] == set(policy.when["critic"][0])


def _paragraph(text: str, start: str) -> str:
    i = text.index(start)
    return text[i : text.index("\n\n", i)]


def test_what_an_estimator_and_a_filter_see():
    text = (DOCS / "algorithms.md").read_text()
    for kind, start in (
        ("advantage", "An estimator is `fn(batch"),
        ("rollout_filter", "A rollout filter is `fn(batch"),
        ("rollout_filter", "A filter is `fn(batch"),
    ):
        named = _ticked(_paragraph(text, start)) & EVERY_KEY
        assert named == set(BATCH_KEYS[kind].every_key()), (kind, start)
