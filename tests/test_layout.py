"""The tree is the design card: the root is the `loraloop` package, the engine imports no host, nothing installs a
top-level `nodes`/`trainer`, and every package folder is listed in pyproject (or it would be missing from a wheel)."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("trainer", "nodes", "a1111", "cli")


def _package_files() -> list[Path]:
    return [ROOT / "__init__.py", ROOT / "__main__.py"] + [p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py")]


def test_top_level_is_the_design_card():
    for name in ("__init__.py", "trainer", "nodes", "a1111", "scripts", "javascript", "style.css", "metadata.ini",
                 "install.py", "web", "example_workflows", "requirements.txt", "tests", "bench", "docs", "cli"):
        assert (ROOT / name).exists(), name
    assert not (ROOT / "loraloop").exists()


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert config["package-dir"] == {"loraloop": "."}
    found = {"loraloop"} | {"loraloop." + ".".join(p.parent.relative_to(ROOT).parts)
                            for d in PACKAGE_DIRS for p in (ROOT / d).rglob("__init__.py")}
    assert set(config["packages"]) == found
    assert all(name == "loraloop" or name.startswith("loraloop.") for name in config["packages"])


def test_package_code_imports_itself_relatively():
    """ComfyUI imports the folder under a name of its own (its path), so `import loraloop…` inside would break there."""
    for path in _package_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad = [n for n in names if n.split(".")[0] in ("loraloop", "trainer", "nodes", "a1111", "cli")]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad} absolutely"


def test_engine_imports_no_host_and_no_front_door():
    hosts = {"comfy", "comfy_api", "folder_paths", "server", "modules", "gradio", "fastapi", "ldm_patched", "backend",
             "modules_forge"}
    for path in (ROOT / "trainer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.split(".")[0] in hosts]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                bad = ([module] if node.level == 0 and module.split(".")[0] in hosts else
                       [module] if node.level >= 2 and module.split(".")[0] in ("nodes", "a1111", "cli") else [])
            else:
                continue
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_installed_package_has_no_top_level_nodes_or_trainer():
    code = textwrap.dedent("""
        import importlib.util, sys
        import loraloop, loraloop.trainer, loraloop.cli
        assert importlib.util.find_spec("nodes") is None and importlib.util.find_spec("trainer") is None
        assert "torch" not in sys.modules, "importing the package must stay cheap"
        print(loraloop.__file__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert Path(out.stdout.strip()) == ROOT / "__init__.py"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "loraloop", "--help"], capture_output=True, text=True, cwd="/",
                         check=True)
    assert "train" in out.stdout and "demo" in out.stdout and "plan" in out.stdout
