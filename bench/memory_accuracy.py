"""Estimated vs measured peak memory of real CPU training steps (tiny and mid-size models), as a table.

    python bench/memory_accuracy.py

Measured: the CPU allocator's peak during `loop.train` (2 steps), from torch.profiler memory events, above what was
allocated before. Estimated: `estimate_memory` for the same settings (adapter + optimizer + activations; the frozen
weights are resident in both). Runs in about a minute on 2 cores.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_memory_estimate import measured_and_estimated, mid_bundle

from loraloop.trainer.bundles.tiny import build_tiny_bundle

CASES = [("tiny-sd1", 64, 2), ("tiny-sd1", 128, 4), ("tiny-sdxl", 64, 2), ("tiny-sdxl", 128, 2), ("mid-sd1", 256, 2)]


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'model':<10} {'px':>4} {'batch':>5} {'gc':>5} {'measured MB':>12} {'estimated MB':>13} {'error':>7}")
    for name, resolution, batch in CASES:
        for gc in (False, True):
            bundle = mid_bundle() if name == "mid-sd1" else build_tiny_bundle(name)
            with tempfile.TemporaryDirectory() as tmp:
                measured, estimated = measured_and_estimated(bundle, Path(tmp), resolution=resolution, batch=batch,
                                                             gc=gc)
            print(f"{name:<10} {resolution:>4} {batch:>5} {gc!s:>5} {measured / 2**20:>12.2f} "
                  f"{estimated / 2**20:>13.2f} {(estimated - measured) / measured:>+7.1%}")


if __name__ == "__main__":
    main()
