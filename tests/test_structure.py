"""The package's shape: the import direction of docs/design.md, and no config field that
nothing reads (a field like that silently ignores what the user set)."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

from rlhf_jax.config import Config

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf_jax"


def _imported_modules(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m for m in out.stdout.split() if m.startswith("rlhf_jax")}


def test_sharding_imports_no_step_or_loop_module():
    loaded = _imported_modules("import rlhf_jax.sharding")
    assert not [m for m in loaded if m.startswith(("rlhf_jax.steps", "rlhf_jax.loops"))], loaded


def test_ops_and_losses_import_no_model_or_step():
    loaded = _imported_modules("import rlhf_jax.ops, rlhf_jax.losses, rlhf_jax.advantages")
    above = ("rlhf_jax.models", "rlhf_jax.steps", "rlhf_jax.loops", "rlhf_jax.sharding")
    assert not [m for m in loaded if m.startswith(above)], loaded


def _fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f.name
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                yield from _fields(type(default), prefix + f.name + ".")


def test_every_config_field_is_read_outside_the_schema():
    """Each field's name is read as an attribute somewhere in the package (besides the
    schema that declares it); generic names are checked with their section."""
    attrs, text = set(), []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "schema.py":
            continue
        source = path.read_text()
        text.append(source)
        attrs |= {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)}
    unread = [key for key, name in _fields(Config) if name not in attrs]
    assert not unread, f"config fields nothing reads: {unread}"
    assert "cfg.task.name" in "\n".join(text)  # "name" alone is read everywhere
