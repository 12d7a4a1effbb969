"""Run by A1111/Forge (at start-up) and by ComfyUI-Manager (after requirements.txt): install only what is missing.

Never installs, upgrades or pins torch, torchvision, xformers, gradio or transformers: the host owns those.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

# import name → pip requirement (from requirements.txt, which ComfyUI-Manager reads directly)
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
IMPORT_NAMES = {"pyyaml": "yaml"}


def missing() -> list[str]:
    out = []
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        req = line.split("#", 1)[0].strip()
        if not req:
            continue
        name = req.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        if importlib.util.find_spec(IMPORT_NAMES.get(name, name)) is None:
            out.append(req)
    return out


def _old_transformers() -> bool:
    """A1111 1.10 pins transformers 4.30: peft ≥ 0.14 cannot import there (no `transformers.Cache`)."""
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("transformers").split(".")[:2])
    except Exception:
        return False
    return (major, minor) < (4, 36)


def plan_installs(todo: list[str], old_transformers: bool) -> list[str]:
    """What to install of the missing requirements `todo` next to the host's transformers.

    With transformers < 4.36 (A1111 1.10 pins 4.30.2): peft 0.13.2 (later peft imports `transformers.Cache`), and no
    diffusers: a current diffusers pulls huggingface_hub ≥ 1.0, with which transformers 4.30 can no longer load the
    CLIP tokenizer, so the webui could not load any checkpoint. The extension does not need diffusers (the memory
    planner uses the shipped architecture sizes; diffusers is only for standalone training).
    """
    if not old_transformers:
        return todo
    return ["peft==0.13.2" if req.startswith("peft") else req for req in todo if not req.startswith("diffusers")]


def main() -> None:
    todo = plan_installs(missing(), _old_transformers())
    if not todo:
        return
    try:  # inside A1111/Forge: their pip wrapper respects --skip-install and their index settings
        import launch  # type: ignore[import-not-found]

        for req in todo:
            launch.run_pip(f'install "{req}"', f"LoRA Loop requirement: {req}")
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *todo])


if __name__ == "__main__":
    main()
