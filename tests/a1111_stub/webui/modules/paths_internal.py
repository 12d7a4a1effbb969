"""Mirrors modules/paths_internal.py: the folders the webui derives from --data-dir. Tests point them at tmp_path."""

from pathlib import Path

script_path = str(Path(__file__).resolve().parent.parent)
data_path = script_path
models_path = str(Path(data_path) / "models")
extensions_dir = str(Path(data_path) / "extensions")
extensions_builtin_dir = str(Path(script_path) / "extensions-builtin")
default_output_dir = str(Path(data_path) / "outputs")
