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


# Packages whose functions stay small: the loops and the planner.
LOOP_SIZE_CHECKED = ("loops", "plan")
MAX_LINES, MAX_POSITIONAL = 80, 8


def _top_functions(tree: ast.AST):
    """Functions and methods not nested in another function (a closure counts in its
    parent's lines)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from _top_functions(node)


def _positional(fn: ast.FunctionDef) -> int:
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    return len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)


def test_loop_and_plan_functions_are_small():
    """No function of loops/ or plan/ over 80 lines (its closures included) or taking more
    than 8 parameters by position: a long one is split, a wide one takes a spec."""
    long, wide = [], []
    for package in LOOP_SIZE_CHECKED:
        for path in sorted((PACKAGE / package).glob("*.py")):
            for fn in _top_functions(ast.parse(path.read_text())):
                where = f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name}"
                if fn.end_lineno - fn.lineno + 1 > MAX_LINES:
                    long.append(where)
                if _positional(fn) > MAX_POSITIONAL:
                    wide.append(where)
    assert not long, f"functions over {MAX_LINES} lines: {long}"
    assert not wide, f"functions over {MAX_POSITIONAL} positional parameters: {wide}"


def test_the_size_check_sees_closures_and_positional_parameters():
    source = "def f(a, b, *, c):\n    def g():\n        pass\n    return g\n\nclass K:\n"
    source += "    def m(self, x):\n        pass\n"
    fns = list(_top_functions(ast.parse(source)))
    assert [f.name for f in fns] == ["f", "m"]
    assert [f.end_lineno - f.lineno + 1 for f in fns] == [4, 2]
    assert [_positional(f) for f in fns] == [2, 1]
