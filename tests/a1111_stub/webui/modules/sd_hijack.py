"""Mirrors the module-level `undo_optimizations()` / `apply_optimizations()` of modules/sd_hijack.py (used by TI)."""

calls = []  # stub-only: "undo" / "apply" in call order


def undo_optimizations():
    calls.append("undo")


def apply_optimizations(option=None):
    calls.append("apply")
    return "stub"
