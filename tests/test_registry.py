"""What the Comfy Registry / ComfyUI-Manager and the A1111 extension index read is present and consistent."""

import json
import re
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def test_comfy_registry_fields_and_one_version_everywhere():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "LoRA Loop" and "includes" in comfy
    assert comfy["Icon"].endswith("web/icon.png") and Image.open(ROOT / "web" / "icon.png").size == (128, 128)
    assert data["project"]["urls"]["Repository"].startswith("https://github.com/")
    version = data["project"]["version"]
    import loraloop

    assert loraloop.__version__ == version
    top = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.MULTILINE)
    assert top and top.group(1) == version, "CHANGELOG.md's newest entry must be the package version"
    # ComfyUI-Manager installs requirements.txt: torch is the host's and never listed there
    reqs = (ROOT / "requirements.txt").read_text(encoding="utf-8").lower()
    assert not re.search(r"^(torch|torchvision|xformers)\b", reqs, re.MULTILINE)


def test_a1111_index_entry():
    entry = json.loads((ROOT / "a1111" / "index-entry.json").read_text(encoding="utf-8"))
    assert {"name", "url", "description", "tags", "added"} <= set(entry)
    assert entry["url"].endswith(".git") and "tab" in entry["tags"]
    assert "Name = loraloop" in (ROOT / "metadata.ini").read_text(encoding="utf-8")
