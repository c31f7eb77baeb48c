"""The ``ray`` marker stays true to what the tests do: a static check of ``tests/`` (no Ray).

CI selects by marker (``.ci/run``'s Ray 2.48 leg is ``-m "ray and not slow and not gpu"``), so a test
that starts Ray without ``ray`` escapes that leg, and one marked ``ray`` that starts no Ray runs
there for nothing. Each test function is read, with the module's fixtures, helper functions and
constants it uses (transitively), for what starts or joins Ray:

* a Ray fixture: ``ray_local`` (``conftest.py``), or a module fixture that uses one or starts Ray;
* a call of ``distmerge.merge`` / ``extract`` / ``verify``, ``run_job``, ``RaySession``,
  ``ray.init``, ``start_local_ray``, ``ray.cluster_utils.Cluster``;
* the command line with a subcommand that starts Ray (``merge``, ``extract``, ``verify``, ``run``,
  ``demo``): in process (``main(["merge", ...])``, ``run_cli("merge", ...)``), as
  ``python -m distmerge merge`` (an argument list or a shell line), ``python -c`` code that merges,
  or a benchmark script that runs distmerge (``bench.py``, ``bench_extract.py``, ``bench_s3.py``, ``gpu_check.sh``).

Such a test must be marked ``ray`` (itself, or by the module's ``pytestmark``) unless ``RAY_FREE``
names it with the reason it never gets to Ray (a refusal made before Ray starts); a test marked
``ray`` must show one of them, and not be in ``RAY_FREE``; a test that runs a benchmark through
distmerge must be ``slow``. The classification was measured once by running every test with each
Ray start recorded (and the ``not ray`` selection with Ray refused); this check keeps it so.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from dataclasses import dataclass, field

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

#: fixtures (``conftest.py``) that start a Ray session
RAY_FIXTURES = {"ray_local"}

#: calls that start or join Ray, as the dotted name a call resolves to through the module's imports
#: (a suffix match: ``distmerge.merge`` is also ``from distmerge import merge``)
RAY_CALLS = (
    "distmerge.merge",
    "distmerge.extract",
    "distmerge.verify",
    "distmerge.app.api.merge",
    "distmerge.app.extract.extract",
    "distmerge.app.verify.verify",
    "distmerge.app.verify.cmd_verify",
    "distmerge.app.jobfile.run_job",
    "distmerge.cluster.RaySession",
    "ray.init",
    "ray.cluster_utils.Cluster",
    "helpers.start_local_ray",
)

#: command-line subcommands that start or join Ray
RAY_SUBCOMMANDS = {"merge", "extract", "verify", "run", "demo"}

#: tests that reach a Ray entry point but never start Ray (each Ray start recorded over a whole run:
#: none), and why (``file::test``). Not here: ``merge`` refusals found while the inputs are read (the
#: ``test_preflight.py`` "before Ray" cases, ``test_cli.py``'s bad inputs), because ``merge()`` starts
#: Ray on a thread of its own as it begins (``RaySession.start``) and shuts it down after the refusal.
RAY_FREE: dict[str, str] = {
    "test_bench.py::test_base_without_lora_is_refused": "bench.py refuses its arguments",
    "test_session_lifetime.py::test_a_lazy_session_starts_nothing_until_something_waits_for_ray": (
        "a lazy session is never started"
    ),
    "test_bench.py::test_generate_only_prints_the_paths": "bench.py --generate-only runs nothing",
    "test_cli.py::test_usage_errors_exit_2_and_help_lists_options": "usage errors and --help come before Ray",
    "test_extract.py::test_a_layout_that_cannot_name_the_base_is_refused_before_ray": "extract plans before Ray",
    "test_extract.py::test_usage_errors_are_one_line_before_anything_runs": "usage errors come before Ray",
    "test_first_hour.py::test_at_once_answers_load_neither_torch_nor_ray": "answered before Ray is imported",
    "test_first_hour.py::test_mistyped_flag_is_named_with_the_nearest": "a usage error",
    "test_first_hour.py::test_unreachable_address_fails_at_once": "the address is probed before ray.init",
    "test_gpu_check.py::test_a_failed_step_does_not_stop_the_others": "no merge step is run",
    "test_gpu_check.py::test_missing_python_fails_every_step": "no step can run",
    "test_gpu_check.py::test_steps_past_the_budget_are_skipped": "no merge step is run",
    "test_jobfile.py::test_a_bad_lora_in_a_later_merge_stops_the_job_before_the_first": "checked before Ray",
    "test_jobfile.py::test_missing_inputs_are_found_before_any_merge_runs": "checked before Ray",
    "test_options.py::test_merge_rejects_an_unknown_keyword_before_anything_runs": "a TypeError first",
    "test_preflight.py::test_bad_numbers_are_usage_errors_before_ray": "usage errors come before Ray",
    "test_preflight.py::test_run_check_runs_the_preflight": "run --check merges nothing",
}


@dataclass
class Evidence:
    """What a function (with what it uses) does that starts Ray."""

    found: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.found)

    def add(self, other: Evidence) -> None:
        self.found |= other.found


def _dotted(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _marks(decorators: list[ast.expr]) -> set[str]:
    """Names ``X`` of ``pytest.mark.X`` / ``pytest.mark.X(...)`` among ``decorators``."""
    out = set()
    for d in decorators:
        node = d.func if isinstance(d, ast.Call) else d
        if isinstance(node, ast.Attribute) and _dotted(node.value) == "pytest.mark":
            out.add(node.attr)
    return out


def _is_fixture(fn: ast.FunctionDef) -> bool:
    return any(
        _dotted(d.func if isinstance(d, ast.Call) else d) in ("pytest.fixture", "fixture") for d in fn.decorator_list
    )


def _params(fn: ast.FunctionDef) -> list[str]:
    return [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]


def _name_of(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _text(node: ast.Constant | ast.JoinedStr) -> str:
    """A string constant, or an f-string's literal parts (each placeholder as ``{}``)."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else ""
    return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


#: text that runs a Ray-starting command: ``-m distmerge merge`` (a shell line), ``python -c`` code
#: calling merge/extract/verify/run_job/ray.init, a benchmark script that runs distmerge
_RAY_TEXT = re.compile(
    r"-m distmerge (?P<sub>merge|extract|verify|run|demo)\b"
    r"|(?P<code>(?:^|[\s;(=.])(?:merge|extract|verify|run_job|ray\.init)\()"
    r"|(?P<bench>(?:^|/)(?:bench|bench_extract|bench_s3)\.py$|(?:^|/)gpu_check\.sh$)"
)


def text_evidence(text: str) -> set[str]:
    found = set()
    for m in _RAY_TEXT.finditer(text):
        if m.group("code") and "\n" not in text and ";" not in text:
            continue  # a call named in a message, not code for ``python -c``
        found.add(m.group("sub") or ("python -c" if m.group("code") else "benchmark"))
    return found


def argv_evidence(items: list[ast.expr]) -> set[str]:
    """``[..., "-m", "distmerge", "merge", ...]``, or ``["merge", ...]`` (an argv for ``main``)."""
    s = [i.value if isinstance(i, ast.Constant) and isinstance(i.value, str) else None for i in items]
    if s and s[0] in RAY_SUBCOMMANDS:
        return {s[0]}
    return {s[i + 2] for i in range(len(s) - 2) if s[i : i + 2] == ["-m", "distmerge"] and s[i + 2] in RAY_SUBCOMMANDS}


class Module:
    """One test module: its imports, functions, constants, tests and marks."""

    def __init__(self, path: str) -> None:
        self.name = os.path.basename(path)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        self.imports: dict[str, str] = {}
        self.functions: dict[str, ast.FunctionDef] = {}
        self.constants: dict[str, ast.expr] = {}
        self.tests: dict[str, tuple[ast.FunctionDef, set[str]]] = {}  #: name -> (def, its and its class's marks)
        self.module_marks: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.imports[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    self.imports[a.asname or a.name] = f"{node.module}.{a.name}" if node.module else a.name
            elif isinstance(node, ast.FunctionDef):
                self.functions[node.name] = node
                if node.name.startswith("test"):
                    self.tests[node.name] = (node, _marks(node.decorator_list))
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name.startswith("test"):
                        marks = _marks(node.decorator_list) | _marks(item.decorator_list)
                        self.tests[f"{node.name}::{item.name}"] = (item, marks)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        self.constants[t.id] = node.value
                        if t.id == "pytestmark":
                            v = node.value
                            self.module_marks = _marks(v.elts if isinstance(v, (ast.List, ast.Tuple)) else [v])
        self._memo: dict[str, Evidence] = {}

    def resolve(self, func: ast.expr) -> str:
        """The dotted name a called expression refers to, through the module's imports."""
        name = _dotted(func) or ""
        head, _, rest = name.partition(".")
        origin = self.imports.get(head)
        return name if origin is None else f"{origin}.{rest}" if rest else origin

    def evidence(self, fn: ast.FunctionDef, seen: frozenset[str] = frozenset()) -> Evidence:
        """What ``fn`` does that starts Ray, with the fixtures it requests and the module's
        functions and constants it uses (transitively)."""
        ev = Evidence()
        for p in _params(fn):
            if p in RAY_FIXTURES:
                ev.found.add(p)
            elif p in self.functions and _is_fixture(self.functions[p]) and p not in seen:
                ev.add(self._of(p, seen))
        parsed_only = {  # argument lists that are only parsed, never run
            id(a) for n in ast.walk(fn) if isinstance(n, ast.Call) and _name_of(n.func) == "parse_args" for a in n.args
        }
        for node in ast.walk(fn):
            if isinstance(node, ast.Call):
                target = self.resolve(node.func)
                if any(target == c or target.endswith("." + c) for c in RAY_CALLS):
                    ev.found.add(target)
                first = node.args[0] if node.args else None
                if (
                    isinstance(first, ast.Constant)
                    and first.value in RAY_SUBCOMMANDS
                    and re.search(r"cli|main|console", _name_of(node.func))
                ):
                    ev.found.add(first.value)  # run_cli("merge", ...)
            elif isinstance(node, (ast.List, ast.Tuple)) and id(node) not in parsed_only:
                ev.found |= argv_evidence(node.elts)
            elif isinstance(node, (ast.Constant, ast.JoinedStr)):
                ev.found |= text_evidence(_text(node))
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in seen:
                if node.id in self.functions and not _is_fixture(self.functions[node.id]):
                    ev.add(self._of(node.id, seen))  # a helper, called or handed on (a thread target)
                elif node.id in self.constants:
                    ev.add(self._constant(node.id, seen))
        return ev

    def _of(self, name: str, seen: frozenset[str]) -> Evidence:
        if name not in self._memo:
            self._memo[name] = self.evidence(self.functions[name], seen | {name})
        return self._memo[name]

    def _constant(self, name: str, seen: frozenset[str]) -> Evidence:
        """A module constant: a script path, ``python -c`` code, an argument list, or built from others."""
        ev = Evidence()
        for node in ast.walk(self.constants[name]):
            if isinstance(node, (ast.Constant, ast.JoinedStr)):
                ev.found |= text_evidence(_text(node))
            elif isinstance(node, (ast.List, ast.Tuple)):
                ev.found |= argv_evidence(node.elts)
            elif isinstance(node, ast.Name) and node.id in self.constants and node.id not in seen | {name}:
                ev.add(self._constant(node.id, seen | {name}))
        return ev


@functools.cache
def classify() -> dict[str, tuple[set[str], Evidence]]:
    """``file::test`` -> (its marks, with the module's; what it does that starts Ray)."""
    out = {}
    for n in sorted(os.listdir(TESTS)):
        if re.fullmatch(r"test_\w+\.py", n) and n != os.path.basename(__file__):  # not its own examples
            m = Module(os.path.join(TESTS, n))
            for name, (fn, marks) in m.tests.items():
                out[f"{m.name}::{name}"] = (marks | m.module_marks, m.evidence(fn))
    return out


def test_every_test_that_starts_ray_is_marked_ray():
    unmarked = [
        f"{test} ({', '.join(sorted(ev.found))})"
        for test, (marks, ev) in classify().items()
        if ev and "ray" not in marks and test not in RAY_FREE
    ]
    assert not unmarked, (
        "these tests start Ray but are not marked ray (add @pytest.mark.ray, or name them in "
        "RAY_FREE with the reason they never get to Ray):\n" + "\n".join(unmarked)
    )


def test_no_test_is_marked_ray_without_starting_it():
    needless = [t for t, (marks, ev) in classify().items() if "ray" in marks and (not ev or t in RAY_FREE)]
    assert not needless, "these tests are marked ray but start no Ray (remove the mark):\n" + "\n".join(needless)


def test_benchmark_runs_are_marked_slow():
    """A test that runs a benchmark script through distmerge is ``slow`` (kept out of ``-m "not slow"``)."""
    tests = classify()
    unmarked = [t for t, (marks, ev) in tests.items() if "benchmark" in ev.found and "slow" not in marks]
    unmarked = [t for t in unmarked if t not in RAY_FREE]
    assert not unmarked, "these tests run a benchmark but are not marked slow:\n" + "\n".join(unmarked)


def test_ray_free_names_tests_that_reach_a_ray_entry_point():
    tests = classify()
    stale = [t for t in RAY_FREE if t not in tests or not tests[t][1]]
    assert not stale, f"RAY_FREE names tests that are gone or reach no Ray entry point: {stale}"


@pytest.mark.parametrize(
    "text, found",
    [
        ("import distmerge; distmerge.merge(b, [l], o)", {"python -c"}),
        ("import sys\nrep = verify(b, [l], o)\n", {"python -c"}),
        ("env -u RAY_ADDRESS python -m distmerge merge --base b", {"merge"}),
        ("/repo/benchmarks/bench.py", {"benchmark"}),
        ("distmerge.merge(...) failed", set()),  # a message, not code
        ("python -m distmerge inspect --lora l", set()),
    ],
)
def test_the_check_reads_commands_and_code_in_strings(text, found):
    assert text_evidence(text) == found


def test_the_check_follows_fixtures_helpers_and_imports():
    src = (
        "import pytest\nfrom distmerge.app.extract import extract as ex\n"
        "@pytest.fixture\ndef merged(ray_local): ...\n"
        "def _run(): ex('b', 't', 'o')\n"
        "def test_fixture(merged): ...\n"
        "def test_helper(): _run()\n"
        "def test_argv(): main(['merge', '--base', 'b'])\n"
        "def test_grammar(): build_parser().parse_args(['merge', '--base', 'b'])\n"
        "def test_nothing(tiny_base): open(tiny_base)\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "test_x.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(src)
        m = Module(path)
    got = {name: sorted(m.evidence(fn).found) for name, (fn, _) in m.tests.items()}
    assert got == {
        "test_fixture": ["ray_local"],
        "test_helper": ["distmerge.app.extract.extract"],
        "test_argv": ["merge"],
        "test_grammar": [],
        "test_nothing": [],
    }
