"""The shape of the house, measured from the code: short functions, a thin CLI, a short README,
a frozen Config and one test file per library module."""

import ast
import dataclasses
from pathlib import Path

import pytest

from pyro_vae.config import Config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyro_vae"
MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))

#: The longest a library function may be, in lines without its docstring.
MAX_FUNCTION_LINES = 60
#: Per-function limits below the general one.
FUNCTION_LIMITS = {("train.py", "fit"): 50}


def function_lengths(path: Path) -> dict[str, int]:
    """``qualified name -> lines`` for every function in a module, docstrings excluded
    (decorators too; nested functions count towards their parent as well as on their own)."""
    lengths = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = child.end_lineno - child.lineno + 1
                first = child.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    if isinstance(first.value.value, str):
                        lines -= first.end_lineno - first.lineno + 1
                lengths[prefix + child.name] = lines
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return lengths


def test_function_lengths_counts_code_lines_without_the_docstring(tmp_path):
    source = 'def f():\n    """Doc\n    string."""\n    a = 1\n    return a\n'
    (tmp_path / "m.py").write_text(source)
    assert function_lengths(tmp_path / "m.py") == {"f": 3}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_library_function_is_too_long(path):
    too_long = {}
    for name, lines in function_lengths(path).items():
        limit = FUNCTION_LIMITS.get((path.name, name), MAX_FUNCTION_LINES)
        if lines > limit:
            too_long[name] = f"{lines} > {limit}"
    assert not too_long, f"{path.name}: split these functions: {too_long}"


def test_cli_is_thin():
    lines = len((PACKAGE / "cli.py").read_text().splitlines())
    assert lines <= 300, f"cli.py has {lines} lines; it should only parse, call and print"


def test_readme_is_a_front_door():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move detail to docs/"


def test_config_is_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    assert dataclasses.replace(config, epochs=3).epochs == 3


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_library_module_has_its_test_file(path):
    assert (ROOT / "tests" / f"test_{path.stem}.py").is_file()
