"""LoRA Loop's TrainLoRA vs ComfyUI's built-in TrainLoraNode, in the same REAL ComfyUI: seconds per step, peak memory.

    COMFYUI_DIR=/path/to/ComfyUI .venv/bin/python bench/comfy_vs_builtin.py --resolution 256 --steps 4

Both trainers get the same random-weight SD1.5 checkpoint (tests/comfy_real_support/checkpoint.py), the same 12 demo
images resized to a square `--resolution` (captions as .txt sidecars, which both read), batch size 1, LoRA rank
`--rank`, AdamW, a constant learning rate, fp32 weights and compute on CPU (`--cpu`: ComfyUI loads the UNet in fp32),
gradient checkpointing as each node does by default (`--checkpointing default`: the built-in node on, ours `auto`, i.e.
the memory planner turns it off when the free memory allows; `on`/`off` force it for both), no sampling. What each
trains is its own default: ours puts LoRA on the UNet's transformer blocks (kohya's targets), the built-in node on
every weighted layer (all linear and conv layers, plus bias/norm diffs).

Method (bench/README.md): each trainer gets a fresh ComfyUI server (python from COMFYUI_PYTHON or the checkout's
.venv) and runs its training prompt twice: a warm-up (`--warmup` steps: loads the checkpoint and, for the built-in
node, caches its dataset nodes), then the timed run (`--steps` steps, another seed so nothing comes from the cache).
Both nodes move ComfyUI's progress bar once per optimizer step; the bench listens on ComfyUI's websocket and takes
the median interval between the training node's consecutive `progress` events as seconds per step (loading,
encoding and saving are outside those intervals). Peak memory = the server process's peak resident set (VmHWM,
reset through /proc/PID/clear_refs just before the timed run; cross-checked by sampling VmRSS every 50 ms); "extra"
is that peak minus the RSS just before the run. Prints a table and writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from comfy_real_support.server import (  # noqa: E402
    ComfyServer,
    EventListener,
    RssSampler,
    cached_nodes,
    copy_dataset,
    execution_seconds,
    make_layout,
)

MB = 2**20
FOLDER = "bench_dataset"


def ours_prompt(ckpt: str, object_info: dict, steps: int, args: argparse.Namespace) -> dict:
    info = object_info["LoRALoop_TrainConfig"]["input"]
    config = {name: spec[1]["default"] for part in ("required", "optional") for name, spec in info.get(part, {}).items()
              if isinstance(spec[1], dict) and "default" in spec[1]}
    config.update(resolution=args.resolution, enable_bucket=False, min_bucket_reso=min(args.resolution, 256),
                  max_train_steps=steps,
                  lora_rank=args.rank, batch_size=1, accumulation_steps=1,
                  learning_rate=args.lr, lr_scheduler="constant", lr_warmup_steps=0, optimizer="adamw",
                  mixed_precision="no", gradient_checkpointing={"default": "auto"}.get(args.checkpointing,
                                                                                       args.checkpointing),
                  cache_latents=True,
                  seed=args.seed, sample_prompts="", sample_every_n_steps=0, save_every_n_steps=0,
                  save_every_n_epochs=0)
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "data": {"class_type": "LoRALoop_LoadDataset", "inputs": {"folder": FOLDER, "recursive": False,
                                                                  "caption_extension": ".txt"}},
        "config": {"class_type": "LoRALoop_TrainConfig", "inputs": config},
        "train": {"class_type": "LoRALoop_TrainLoRA", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "dataset": ["data", 0],
            "config": ["config", 0], "name": "bench", "save_on_cancel": False}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["train", 3]}},  # the loss plot: an output node
    }


def builtin_prompt(ckpt: str, object_info: dict, steps: int, args: argparse.Namespace) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "data": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": FOLDER}},
        "encode": {"class_type": "MakeTrainingDataset", "inputs": {"images": ["data", 0], "texts": ["data", 1],
                                                                   "vae": ["ckpt", 2], "clip": ["ckpt", 1]}},
        "train": {"class_type": "TrainLoraNode", "inputs": {
            "model": ["ckpt", 0], "latents": ["encode", 0], "positive": ["encode", 1], "batch_size": 1,
            "grad_accumulation_steps": 1, "steps": steps, "learning_rate": args.lr, "rank": args.rank,
            "optimizer": "AdamW", "loss_function": "MSE", "seed": args.seed, "training_dtype": "fp32",
            "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": args.checkpointing != "off",
            "existing_lora": "[None]", "bucket_mode": False, "bypass_mode": False}},
        "out": {"class_type": "SaveLoRA", "inputs": {"lora": ["train", 0], "prefix": "loras/bench_builtin",
                                                     "steps": ["train", 2]}},
    }


def executed_nodes(entry: dict) -> set[str]:
    """class types that ran (not cached) in a finished prompt."""
    prompt = entry["prompt"][2]
    return {prompt[n]["class_type"] for n in prompt if n not in cached_nodes(entry)}


TRAINERS = {"loraloop": ("LoRALoop_TrainLoRA", ours_prompt), "builtin": ("TrainLoraNode", builtin_prompt)}


def prepare(base: Path, ckpt: Path, resolution: int) -> None:
    make_layout(base, ckpt)
    folder = copy_dataset(ROOT / "cli" / "demo" / "dataset", base / "input" / FOLDER, resolution)
    with (folder / "metadata.csv").open(encoding="utf-8") as f:  # the built-in loader reads .txt sidecars only
        for row in csv.DictReader(f):
            (folder / (Path(row["filename"]).stem + ".txt")).write_text(row["prompt"], encoding="utf-8")


def bench_one(name: str, comfy_dir: Path, ckpt: Path, args: argparse.Namespace) -> dict:
    node_id, make = TRAINERS[name]
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        base = Path(tmp)
        prepare(base, ckpt, args.resolution)
        server = ComfyServer(comfy_dir, base, extra_args=("--disable-api-nodes",))
        with server:
            info = server.get("/object_info")
            if node_id not in info:
                raise SystemExit(f"{node_id} is not registered in this ComfyUI")
            events = EventListener(server)
            runs = []
            for i, steps in enumerate((args.warmup, args.steps)):
                before = server.rss()
                server.reset_peak_rss()
                # a new seed per run: an identical prompt would come from ComfyUI's cache in 0 s
                run_args = argparse.Namespace(**{**vars(args), "seed": args.seed + i})
                with RssSampler(server) as sampler:
                    prompt_id = server.queue(make(ckpt.name, info, steps, run_args), client_id=events.client_id)
                    entry = server.wait(prompt_id, timeout=args.timeout)
                if node_id not in executed_nodes(entry):
                    raise SystemExit(f"{name}: the training node did not run in run {i} (cached?)")
                ticks = events.progress_times(prompt_id, "train")
                intervals = [b[0] - a[0] for a, b in itertools.pairwise(ticks)]
                cpu = [b[1] - a[1] for a, b in itertools.pairwise(ticks)]
                texts = [t for out in entry.get("outputs", {}).values() for t in out.get("text", [])]
                plan = next((line.split(":", 1)[1].strip() for t in texts for line in t.splitlines()
                             if line.startswith("settings:")), None)  # ours: the memory plan's chosen settings
                runs.append({"steps": steps, "seconds": execution_seconds(entry), "progress_events": len(ticks),
                             "plan_settings": plan,
                             "step_intervals_s": intervals, "step_cpu_s": cpu, "rss_before_mb": before / MB,
                             "peak_rss_mb": server.peak_rss() / MB, "sampled_peak_mb": sampler.peak / MB,
                             "load_avg_1min": os.getloadavg()[0]})
                print(f"  {name} {'warm-up' if i == 0 else 'timed'} ({steps} steps): {runs[-1]['seconds']:.1f} s, "
                      f"step intervals {[round(x, 2) for x in intervals]} (CPU {[round(x, 2) for x in cpu]}), "
                      f"peak RSS {runs[-1]['peak_rss_mb']:.0f} MB, "
                      f"load {runs[-1]['load_avg_1min']:.1f}" + (f"; plan: {plan}" if plan else ""), flush=True)
            events.close()
            log = server.log_text()
    if "lora key not loaded" in log or "Traceback" in log:
        print(f"  warning: {name}: the server log has errors:\n{log[-3000:]}")
    timed = runs[-1]
    if len(timed["step_intervals_s"]) != args.steps - 1:
        raise SystemExit(f"{name}: expected {args.steps} progress events of the training node, got "
                         f"{timed['progress_events']}")
    return {"trainer": name, "node": node_id, "runs": runs,
            "s_per_step": statistics.median(timed["step_intervals_s"]),
            "s_per_step_mean": statistics.fmean(timed["step_intervals_s"]),
            "s_per_step_min": min(timed["step_intervals_s"]),
            "cpu_s_per_step": statistics.median(timed["step_cpu_s"]),
            "peak_rss_mb": timed["peak_rss_mb"], "sampled_peak_mb": timed["sampled_peak_mb"],
            "extra_mb": timed["peak_rss_mb"] - timed["rss_before_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="steps of the timed run (≥ 3: s/step is the median of the "
                   "steps-1 intervals between its progress events)")
    p.add_argument("--warmup", type=int, default=1, help="steps of the untimed first run")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing", choices=("default", "on", "off"), default="default",
                   help="default: each node's default (built-in on, ours auto = the memory planner decides); "
                        "on/off: forced for both")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_const", const="off",
                   help="same as --checkpointing off")
    p.add_argument("--only", choices=sorted(TRAINERS), action="append", help="run only this trainer (repeatable)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.steps < 3 or args.warmup < 1:
        p.error("--steps must be ≥ 3 and --warmup ≥ 1")
    comfy_dir = Path(os.environ.get("COMFYUI_DIR") or p.error("set COMFYUI_DIR")).resolve()

    from comfy_real_support.checkpoint import sd15_checkpoint

    ckpt = sd15_checkpoint()
    version = (comfy_dir / "comfyui_version.py").read_text().split('"')[1]
    print(f"ComfyUI {version}, CPU, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"{args.resolution}px, rank {args.rank}, batch 1, {args.warmup} + {args.steps} steps, fp32, gradient "
          f"checkpointing {args.checkpointing}", flush=True)
    results = [bench_one(name, comfy_dir, ckpt, args) for name in (args.only or ["loraloop", "builtin"])]
    print(f"\n{'trainer':<10} {'s/step':>8} {'(min)':>7} {'CPU s/step':>11} {'peak RSS MB':>12} {'(sampled)':>10} "
          f"{'extra MB':>9}")
    for r in results:
        print(f"{r['trainer']:<10} {r['s_per_step']:>8.2f} {r['s_per_step_min']:>7.2f} {r['cpu_s_per_step']:>11.2f} "
              f"{r['peak_rss_mb']:>12.0f} {r['sampled_peak_mb']:>10.0f} {r['extra_mb']:>9.0f}")
    if len(results) == 2:
        ours, builtin = results
        print(f"\nspeed-up {builtin['s_per_step'] / ours['s_per_step']:.2f}x wall (median), "
              f"{builtin['s_per_step_min'] / ours['s_per_step_min']:.2f}x wall (min), "
              f"{builtin['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}x CPU time; peak RSS "
              f"{ours['peak_rss_mb']:.0f} vs {builtin['peak_rss_mb']:.0f} MB "
              f"(extra {ours['extra_mb']:.0f} vs {builtin['extra_mb']:.0f} MB)")
    if args.json:
        args.json.write_text(json.dumps({"comfyui": version, "args": {k: v for k, v in vars(args).items()
                                                                       if k != "json"}, "results": results},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
