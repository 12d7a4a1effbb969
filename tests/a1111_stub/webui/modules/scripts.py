"""Mirrors `modules.scripts.basedir()`: the folder of the extension whose script is being imported."""

from modules import paths_internal

current_basedir = paths_internal.script_path


def basedir():
    return current_basedir
