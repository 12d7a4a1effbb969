"""Seconds per step and peak memory: LoRA Loop's TrainLoRA in a real ComfyUI.

Comparison with the built-in TrainLoraNode is NOT wired yet: its dataset nodes (LoadImageTextDataSetFromFolder →
MakeTrainingDataset) must be run the same way here; until then run the built-in node from the UI with the same
dataset, rank and steps and compare its progress-bar time per step.

Needs a ComfyUI checkout (COMFYUI_DIR) with this repo in custom_nodes/, a checkpoint name in models/checkpoints and
a dataset folder in input/. Runs both nodes in-process on the same MODEL, same images, rank, batch size and steps:

    COMFYUI_DIR=~/ComfyUI python bench/comfy_bench.py --ckpt v1-5-pruned-emaonly.safetensors --dataset style --steps 50

Method: each trainer runs `--steps` steps after `--warmup` untimed ones; time per step is wall time / steps with
CUDA synchronised; peak memory is torch.cuda.max_memory_allocated() after reset (CPU: ru_maxrss). Both get the model
fully loaded first, so loading is not counted. Report the GPU and ComfyUI version with the numbers.
"""

import argparse
import os
import sys
import time
from pathlib import Path


def _peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak():
    import resource

    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dataset", required=True, help="folder under ComfyUI's input directory")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    comfy_dir = Path(os.environ["COMFYUI_DIR"]).resolve()
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.cpu
    import torch

    import nodes
    
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from loraloop.comfy import nodes as ours

    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(args.ckpt)[:3]
        dataset = ours.LoadDataset.execute(folder=args.dataset, recursive=False, caption_extension=".txt").args[0]
        widgets = {i.id: i.default for i in ours.LoRATrainConfig.define_schema().inputs if i.default is not None}
        results = {}
        for steps in (args.warmup, args.warmup + args.steps):
            config = ours.LoRATrainConfig.execute(**{**widgets, "max_train_steps": steps, "lora_rank": args.rank,
                                                     "resolution": args.resolution, "enable_bucket": False}).args[0]
            _peak_reset()
            t = time.perf_counter()
            ours.TrainLoRA.execute(model=model, clip=clip, vae=vae, dataset=dataset, config=config, name="bench",
                                   save_on_cancel=False)
            results.setdefault("loraloop", []).append((time.perf_counter() - t, _peak()))
    for name, ((t0, _), (t1, peak)) in ((k, v) for k, v in results.items() if len(v) == 2):
        print(f"{name}: {(t1 - t0) / args.steps:.3f} s/step, peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
