"""Units and durations (trainer/units.py), and the facts the package defines exactly once."""

import ast
import re
from pathlib import Path

import pytest

from loraloop.trainer.units import GIB, fmt_duration, fmt_eta

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FILES = [p for d in ("trainer", "nodes", "a1111", "cli") for p in (ROOT / d).rglob("*.py")]


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00"), (-5, "0:00"), (59.9, "0:59"), (61, "1:01"),
                                               (3599, "59:59"), (3600, "1:00:00"), (3723, "1:02:03")])
def test_fmt_eta(seconds, text):
    assert fmt_eta(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), [(40, "40 s"), (600, "10 min"), (9000, "2.5 h")])
def test_fmt_duration(seconds, text):
    assert fmt_duration(seconds) == text


def test_gib():
    assert GIB == 2**30


def _where(pattern: str) -> list[str]:
    regex = re.compile(pattern, re.MULTILINE)
    return sorted(str(p.relative_to(ROOT)) for p in PACKAGE_FILES
                  for _ in regex.finditer(p.read_text(encoding="utf-8")))


@pytest.mark.parametrize(("pattern", "home"), [
    (r"^\s*def _?fmt_eta\(", "trainer/units.py"),
    (r"^\s*GIB\s*=", "trainer/units.py"),
    (r"^\s*MIN_RANK\s*=", "trainer/network.py"),
    (r"^\s*ADAPTER\s*=", "trainer/network.py"),
    (r"^\s*PLANNABLE\s*=", "trainer/config.py"),
    (r"^\s*def bucket_defaults\(", "trainer/config.py"),
    (r"^\s*def network_spec\(", "trainer/network.py"),
])
def test_defined_once(pattern, home):
    assert _where(pattern) == [home]


def test_no_second_default_rank():
    """The default rank is TrainConfig's field default; nothing else writes the number."""
    assert _where(r"^\s*(lora_)?rank: int = [1-9]") == []  # a process rank defaults to 0; an adapter rank never
    assert _where(r'"--rank".*default=\d') == []


def test_network_spec_is_built_from_config_in_one_function():
    """Every `NetworkSpec(...)` whose arguments read a config sits in `network.network_spec`."""
    found = []
    for path in PACKAGE_FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) ==
                        "NetworkSpec" and "config" in ast.unparse(node)):
                    found.append((str(path.relative_to(ROOT)), func.name))
    assert sorted(set(found)) == [("trainer/network.py", "network_spec")]
