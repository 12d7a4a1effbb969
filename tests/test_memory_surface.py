"""trainer/memory's public surface and its grouping into estimation / planning / recovery."""

import importlib
from pathlib import Path

import loraloop.trainer.memory as memory

ROOT = Path(__file__).resolve().parent.parent
MEMORY = ROOT / "trainer" / "memory"

# What runners and hosts call (runner, loop, nodes/plan, a1111/plan, cli/plan).
PUBLIC = {"plan_for_config", "Plan", "make_plan", "PlanRequest", "DatasetFacts", "OomRecovery", "SpillGuard",
          "release_memory", "GIB", "current_device", "free_bytes", "find_device", "with_memory", "GENERIC_GPU",
          "CUDA_CONTEXT_BYTES", "ModelInfo", "model_info", "DEFAULT_MARGIN"}


def test_public_surface():
    assert set(memory.__all__) >= PUBLIC
    for name in memory.__all__:
        assert getattr(memory, name) is not None, name
    from loraloop.trainer import units

    assert memory.GIB is units.GIB


def test_modules_are_grouped_by_what_they_do():
    groups = {sub: sorted(p.stem for p in (MEMORY / sub).glob("*.py") if p.stem != "__init__")
              for sub in ("estimation", "planning", "recovery")}
    assert groups == {"estimation": ["architecture", "devices", "dit", "estimate", "probe", "profiles", "simulate",
                                     "tracer"],
                      "planning": ["autoplan", "planner", "tiers"], "recovery": ["ladder", "levers", "spill"]}
    assert sorted(p.name for p in MEMORY.glob("*.py")) == ["__init__.py"]
    for sub, names in groups.items():
        for name in names:
            importlib.import_module(f"loraloop.trainer.memory.{sub}.{name}")


def test_profiles_ship_next_to_their_module():
    from loraloop.trainer.memory.estimation.profiles import PROFILE_FILE, load_shipped

    assert PROFILE_FILE == MEMORY / "estimation" / "profiles.json" and PROFILE_FILE.is_file()
    assert {"sd1", "sdxl"} <= set(load_shipped())
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert data["package-data"]["loraloop.trainer.memory.estimation"] == ["*.json"]


def test_recommendations_live_with_the_data():
    assert not (MEMORY / "recommend.py").exists()
    from loraloop.trainer.data.recommend import recommend

    assert callable(recommend)
