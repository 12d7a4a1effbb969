"""The benchmark scripts still run against the current engine (their real runs need a GPU or a ComfyUI checkout; a
broken script would waste a GPU session's few minutes)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vram_plan_gpu_smoke_runs_the_whole_script_on_cpu(capsys):
    """--smoke: tiny models on the CPU through the same planning, caching, training and report code."""
    script = _load("vram_plan_gpu")
    assert script.main(["--smoke", "--families", "sd1", "--budgets", "4", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "OK: no OOM" in out and "crashed" not in out


def test_vram_plan_gpu_without_cuda_says_how_to_check_it(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():  # pragma: no cover - only on a GPU machine
        pytest.skip("a CUDA device is present")
    assert _load("vram_plan_gpu").main([]) == 2
    assert "--smoke" in capsys.readouterr().out


def test_vram_plan_gpu_smoke_runs_flux_with_swapped_blocks_and_fp8(capsys):
    """The Flux path of the GPU script (random conditioning, block swap, then fp8 weights) on a tiny Flux."""
    script = _load("vram_plan_gpu")
    assert script.main(["--smoke", "--families", "flux1", "--budgets", "8", "--fp8-budgets", "8", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "blocks_to_swap 2" in out and "flux1-fp8" in out and "OK: no OOM" in out
