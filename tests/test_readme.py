"""The README's two set-up commands stay the ones CI runs and the console script provides."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_first_two_commands_are_demo_and_tests_and_ci_runs_the_test_command():
    demo, tests = _commands()[:2]
    assert demo.startswith("python3 -m venv .venv && ") and demo.endswith("distmerge demo")
    assert "torch==2.13.0" in demo and "torch==2.13.0" in tests
    assert tests.endswith("-m pytest")
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert tests in ci.splitlines()


def test_every_documented_subcommand_exists():
    from distmerge.app.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    documented = set(re.findall(r"^distmerge (\w+)", "\n".join(_commands()), flags=re.M))
    assert documented <= set(sub.choices), documented - set(sub.choices)
    assert {"merge", "inspect", "verify", "run", "demo"} <= set(sub.choices)
