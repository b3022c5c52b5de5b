"""The test suite itself: no test module imports another (shared helpers and fixtures live in tests/conftest.py),
neither in its own imports nor in the scripts it hands to a subprocess."""

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
IN_A_SCRIPT = re.compile(r"^\s*(?:from|import)\s+((?:tests\.)?test_\w+)", re.M)


def module_names():
    return {p.stem for p in TESTS.glob("test_*.py")}


def imported_test_modules(source, modules):
    """The test modules (names in `modules`) that `source` imports, as written up to the module: import statements
    (plain, `tests.`-qualified, `from tests import ...`, relative, inside functions) and import lines inside string
    constants (a script handed to a subprocess)."""

    def test_module(name):
        parts = name.split(".")
        hits = [i for i, part in enumerate(parts) if part in modules]
        return ".".join(parts[:hits[0] + 1]) if hits else None

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [base] + [f"{base}.{a.name}".lstrip(".") for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = IN_A_SCRIPT.findall(node.value)
        else:
            continue
        found |= {test_module(n) for n in names} - {None}
    return found


def test_no_test_module_imports_another():
    modules = module_names()
    offenders = {p.name: sorted(found) for p in sorted(TESTS.glob("test_*.py"))
                 if (found := imported_test_modules(p.read_text(), modules))}
    assert not offenders, f"test modules that import other test modules (move the helper to conftest.py): {offenders}"


def test_the_check_finds_every_way_of_importing_a_test_module():
    modules = {"test_alpha", "test_beta"}
    for source, expected in [
            ("from tests.test_alpha import cfg_for", {"tests.test_alpha"}),
            ("import test_beta", {"test_beta"}),
            ("from test_beta import run as r", {"test_beta"}),
            ("from tests import test_alpha", {"tests.test_alpha"}),
            ("from . import test_beta", {"test_beta"}),
            ("def f():\n    from tests.test_alpha import cfg_for\n", {"tests.test_alpha"}),
            ('script = ("import os\\n"\n          "from test_alpha import cfg_for\\n")', {"test_alpha"})]:
        assert imported_test_modules(source, modules) == expected, source
    for source in ("from tests.conftest import cfg_for", "import conftest", "from train import train",
                   "import testing", '"""Tests of test_alpha.py\'s helpers"""'):
        assert imported_test_modules(source, modules) == set(), source
