"""The bundled demo: `builtin:demo-base` (base/, built by build_base.py) learns the `zqx` concept of concept/ on a CPU.

dataset/ holds the older 12 flat-shape images that tests train the tiny random models on; generate.py draws both.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).parent
DEMO_CONFIG = DEMO_DIR / "demo.yaml"
