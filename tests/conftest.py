import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Outside an environment with `pip install -e .` (e.g. the webui's own venv), import this checkout as `loraloop` the way
# scripts/loraloop_tab.py does, whatever the clone's folder is called; nothing is added to sys.path.
if "loraloop" not in sys.modules and importlib.util.find_spec("loraloop") is None:
    _root = Path(__file__).resolve().parent.parent
    _spec = importlib.util.spec_from_file_location("loraloop", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["loraloop"] = _module
    _spec.loader.exec_module(_module)

DEMO_DATASET = Path(__file__).resolve().parent.parent / "cli" / "demo" / "dataset"
DEMO_CONCEPT = DEMO_DATASET.parent / "concept"


@pytest.fixture
def demo_dataset(tmp_path: Path) -> Path:
    """A copy of the bundled demo dataset (12 shape images + metadata.csv)."""
    target = tmp_path / "dataset"
    shutil.copytree(DEMO_DATASET, target)
    return target


@pytest.fixture
def demo_concept(tmp_path: Path) -> Path:
    """A copy of the demo's LoRA concept (20 `zqx style` images + metadata.csv), which `demo_base` has never seen."""
    target = tmp_path / "concept"
    shutil.copytree(DEMO_CONCEPT, target)
    return target


@pytest.fixture(scope="session")
def demo_base():
    """`builtin:demo-base`: a small SD1-style model (v prediction, 64 px) with trained weights that draws one shape on a
    background in the colours the prompt names. For end-to-end tests that check the samples and not only the loss.
    Remove any adapters before the test ends (use `Network` as a context manager)."""
    from loraloop.trainer.bundles.demo import build_demo_bundle

    return build_demo_bundle()


@pytest.fixture(scope="session")
def tiny_sd1():
    from loraloop.trainer.bundles.tiny import build_tiny_bundle

    return build_tiny_bundle("tiny-sd1")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from loraloop.trainer.bundles.tiny import build_tiny_bundle

    return build_tiny_bundle("tiny-sdxl")


@pytest.fixture(scope="module")
def one_thread():
    """2 cores shared with other jobs: one intra-op thread avoids OpenMP oversubscription (100× slowdowns) in the
    memory tests, which time and trace real steps. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
