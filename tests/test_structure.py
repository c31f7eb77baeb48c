"""The shape of the code, checked: the limits the engine refactoring (issue 22) set, so that they hold.

Small modules and functions, short public signatures (option objects instead of long keyword
lists), no module reaching into another's private names, and one home for each shared constant and
policy. Static reads of ``distmerge/``: no imports, no Ray.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "distmerge"
SOURCES = sorted(PACKAGE.rglob("*.py"))
#: the format tables may reach this
TABLE_MODULES = {"formats/normalize.py": 600}
MODULE_LINES, FUNCTION_LINES, PUBLIC_PARAMS = 450, 60, 8


def _rel(p: pathlib.Path) -> str:
    return p.relative_to(PACKAGE).as_posix()


def _functions(p: pathlib.Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(p.read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _params(f: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = f.args
    names = [x.arg for x in a.posonlyargs + a.args]
    return len(names) + len(a.kwonlyargs) - (1 if names and names[0] in ("self", "cls") else 0)


def test_the_sources_are_found():
    assert len(SOURCES) > 50 and any(_rel(p) == "app/driver.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_module_is_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= TABLE_MODULES.get(_rel(path), MODULE_LINES), f"{_rel(path)}: {lines} lines"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_functions_are_short_and_public_ones_take_few_parameters(path):
    for f in _functions(path):
        length = f.end_lineno - f.lineno + 1 if f.end_lineno else 0
        assert length <= FUNCTION_LINES, f"{_rel(path)}:{f.lineno} {f.name}: {length} lines"
        if not f.name.startswith("_"):
            assert _params(f) <= PUBLIC_PARAMS, f"{_rel(path)}:{f.lineno} {f.name}: {_params(f)} parameters"


_PRIVATE_IMPORT = re.compile(r"from distmerge\.[a-z_.]+ import .*\b_[a-zA-Z]")


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_private_name_is_imported_from_another_module(path):
    hits = [ln for ln in path.read_text(encoding="utf-8").splitlines() if _PRIVATE_IMPORT.search(ln)]
    assert not hits, f"{_rel(path)}: {hits}"


@pytest.mark.parametrize(
    "pattern, what",
    [
        (r"^(ProgressFn) =", "the progress callback's type (output/ledger.py)"),
        (r"^(MANIFEST_VERSION) =", "the resume manifest's version (output/manifest.py)"),
        (r"64 << 20", "the task overhead, TASK_OVERHEAD_BYTES (plan/units.py)"),
        (r"allow_tf32", "the float32 policy on GPUs (tasks/runtime.py)"),
        (r"^def target_unit_bytes\(", "the unit size (plan/units.py)"),
    ],
)
def test_each_shared_constant_and_policy_has_one_home(pattern, what):
    rx = re.compile(pattern)
    hits = [f"{_rel(p)}:{i}" for p in SOURCES for i, ln in enumerate(p.read_text().splitlines(), 1) if rx.search(ln)]
    assert len(hits) == 1, f"{what}: {hits}"


def test_the_cluster_package_knows_no_job():
    """``distmerge.cluster`` imports nothing of distmerge but its errors (import-linter checks it
    too; this says so without the tool)."""
    for p in (PACKAGE / "cluster").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distmerge"):
                assert node.module in ("distmerge.errors",) or node.module.startswith("distmerge.cluster"), (
                    f"{_rel(p)} imports {node.module}"
                )
            elif isinstance(node, ast.ImportFrom) and node.level:
                assert node.module is None or not node.module.startswith(("app", "output", "tasks", "plan")), p
