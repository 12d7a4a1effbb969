"""The bundled demo: a small generated dataset and a config that trains the tiny model on a CPU in about a minute."""

from pathlib import Path

DEMO_DIR = Path(__file__).parent
DEMO_CONFIG = DEMO_DIR / "demo.yaml"
