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


# Every function of the package is held to the size limits below. A nested function counts
# in its outermost function's lines.
MAX_LINES = 80
MAX_POSITIONAL = 8


def _functions(tree: ast.AST):
    """The outermost functions of a module (methods included), with every nested one."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.Module):
            for child in node.body:
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield child, [n for n in ast.walk(child) if n is not child and _is_def(n)]


def _is_def(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)


def _positional(fn: ast.AST, method: bool) -> int:
    """Parameters a caller may pass by position (a method's self / cls left out)."""
    n = len(fn.args.posonlyargs) + len(fn.args.args)
    return (
        n - 1 if method and n and fn.args.args[:1] and fn.args.args[0].arg in ("self", "cls") else n
    )


def _sizes(package: Path, root: Path = PACKAGE.parent):
    """(where, lines, most positional parameters) of every outermost function."""
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
        for fn, nested in _functions(tree):
            lines = fn.end_lineno - fn.lineno + 1
            positional = max(
                [_positional(fn, id(fn) in methods)]
                + [_positional(n, False) for n in nested if not isinstance(n, ast.Lambda)]
            )
            yield f"{path.relative_to(root)}:{fn.name}", lines, positional


def test_sizes_are_counted_as_stated(tmp_path):
    source = (
        "def outer(a, b, /, c, *, d):\n"
        "    def inner(x, y, z, u, v, w, s, t, q):\n"
        "        return x\n"
        "    return inner\n"
        "class K:\n"
        "    def method(self, a, b=1, *args, c=2):\n"
        "        pass\n"
    )
    (tmp_path / "m.py").write_text(source)
    got = {name: (lines, pos) for name, lines, pos in _sizes(tmp_path, tmp_path)}
    assert got == {"m.py:outer": (4, 9), "m.py:method": (2, 2)}


def test_no_function_is_too_long_or_takes_too_many_positional_parameters():
    """Functions stay readable and calls checkable: at most MAX_LINES lines (closures counted
    in their parent) and MAX_POSITIONAL parameters by position (the rest keyword-only)."""
    long, wide = [], []
    for where, lines, positional in _sizes(PACKAGE):
        if lines > MAX_LINES:
            long.append(f"{where} ({lines} lines)")
        if positional > MAX_POSITIONAL:
            wide.append(f"{where} ({positional} positional parameters)")
    assert not long and not wide, (long, wide)
