"""Helpers for the opt-in real-ComfyUI test (tests/test_comfy_real.py) and bench/comfy_vs_builtin.py."""
