"""Every file-system location the nodes touch, resolved so that nothing can escape ComfyUI's folders.

Workflows carry only relative names (a dataset folder relative to the input directory, LoRAs by name), so they can be
shared; a name that is absolute or climbs out of its root (`..`, a symlink pointing elsewhere) is refused with a
message naming the roots that were searched (one clear line per failure).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from ..trainer.errors import ConfigError, DatasetError, LoraFileError
from ..trainer.lorafile import sanitize_name

# Extra dataset roots can be registered in extra_model_paths.yaml under this key (`loraloop_datasets: /data/sets`).
DATASET_ROOTS_KEY = "loraloop_datasets"
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")


def _folder_paths():  # noqa: ANN202 - ComfyUI's module
    import folder_paths

    return folder_paths


def is_plain_relative(name: str) -> bool:
    """True for `a/b/c`: not absolute on any OS, no drive letter, no `..` part."""
    if (not name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
            or PureWindowsPath(name).drive):
        return False
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def resolve_under(root: Path, name: str, what: str) -> Path:
    """`root/name`, refusing absolute names and anything that resolves outside `root` (symlinks included)."""
    clean = name.strip().replace("\\", "/").strip("/")
    base = Path(root).resolve()
    if not is_plain_relative(clean):
        msg = f"invalid {what} {name!r}: give a path relative to {base} (no absolute paths, no '..')"
        raise ConfigError(msg, key=what, value=name)
    target = (base / clean).resolve()
    if target != base and base not in target.parents:
        msg = f"invalid {what} {name!r}: resolves outside of {base}"
        raise ConfigError(msg, key=what, value=name)
    return target


def dataset_roots() -> list[Path]:
    """ComfyUI's input directory, then any folders registered under `loraloop_datasets`."""
    fp = _folder_paths()
    roots = [Path(fp.get_input_directory())]
    if DATASET_ROOTS_KEY in getattr(fp, "folder_names_and_paths", {}):
        roots += [Path(p) for p in fp.get_folder_paths(DATASET_ROOTS_KEY)]
    return roots


def find_dataset_dir(name: str) -> Path:
    """The dataset folder called `name` under the first root that has it."""
    roots = dataset_roots()
    for root in roots:
        folder = resolve_under(root, name, "dataset folder")
        if folder.is_dir():
            return folder
    searched = ", ".join(str(r) for r in roots)
    raise DatasetError(f"dataset folder {name!r} not found; searched: {searched}", path=name)


def loras_dir() -> Path:
    """Where LoRAs are saved: the first `loras` folder, the one LoraLoader lists (hosts.md key fact 7)."""
    return Path(_folder_paths().get_folder_paths("loras")[0])


def lora_names() -> list[str]:
    """LoRA names as LoraLoader lists them; empty outside ComfyUI (schemas are also built there, e.g. in tests)."""
    try:
        fp = _folder_paths()
    except ImportError:
        return []
    return list(fp.get_filename_list("loras"))


def find_lora(name: str) -> Path:
    """A LoRA by the name LoraLoader shows (`sub/x.safetensors`), or by its stem (`x`, as in `<lora:x:0.8>`)."""
    fp = _folder_paths()
    if is_plain_relative(name):
        full = fp.get_full_path("loras", name)
        if full:
            return Path(full)
    wanted = name.strip().lower()
    names = lora_names()
    for candidate in names:
        stem = candidate.rsplit(".", 1)[0] if candidate.lower().endswith(LORA_EXTENSIONS) else candidate
        if wanted in (candidate.lower(), stem.lower(), PurePosixPath(stem.replace("\\", "/")).name.lower()):
            return Path(fp.get_full_path("loras", candidate))
    import difflib

    near = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise LoraFileError(f"no LoRA called {name!r} in {', '.join(fp.get_folder_paths('loras'))}{hint}", path=name)


def lora_target(name: str, subfolder: str = "") -> tuple[Path, str]:
    """(folder, sanitized stem) for a new LoRA file: the stem has no separators, the subfolder stays inside loras."""
    root = loras_dir()
    folder = resolve_under(root, subfolder, "LoRA subfolder") if subfolder.strip() else root
    return folder, sanitize_name(name, "lora")


def output_file(name: str, suffix: str) -> Path:
    """A file under ComfyUI's output directory (`loraloop/<name><suffix>`), the name sanitized."""
    root = Path(_folder_paths().get_output_directory()) / "loraloop"
    return root / f"{sanitize_name(name, 'config')}{suffix}"


def input_file(name: str, what: str) -> Path:
    """An existing file under ComfyUI's input directory."""
    path = resolve_under(Path(_folder_paths().get_input_directory()), name, what)
    if not path.is_file():
        msg = f"{what} {name!r} not found in {_folder_paths().get_input_directory()}"
        raise ConfigError(msg, key=what, value=name)
    return path


def invalidate_lora_list() -> None:
    """Make LoraLoader's next listing see new files (ComfyUI also checks folder mtimes; this covers coarse clocks)."""
    cache = getattr(_folder_paths(), "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop("loras", None)
