import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEMO_DATASET = Path(__file__).resolve().parent.parent / "cli" / "demo" / "dataset"


@pytest.fixture
def demo_dataset(tmp_path: Path) -> Path:
    """A copy of the bundled demo dataset (12 shape images + metadata.csv)."""
    target = tmp_path / "dataset"
    shutil.copytree(DEMO_DATASET, target)
    return target


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
