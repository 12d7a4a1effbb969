"""Mirrors the names of modules/paths.py that extensions use."""

from modules.paths_internal import data_path, extensions_builtin_dir, extensions_dir, models_path, script_path  # noqa: F401
