"""LoRA Loop's TrainLoRA vs ComfyUI's built-in TrainLoraNode, in the same REAL ComfyUI: seconds per step, peak memory.

    COMFYUI_DIR=/path/to/ComfyUI .venv/bin/python bench/comfy_vs_builtin.py --resolution 256 --steps 4
    COMFYUI_DIR=/path/to/ComfyUI .venv/bin/python bench/comfy_vs_builtin.py --family flux --resolution 256 --steps 6
    COMFYUI_DIR=/path/to/ComfyUI .venv/bin/python bench/comfy_vs_builtin.py --family flux --flux-size mid --steps 8

Both trainers get the same model, the same 12 demo images resized to a square `--resolution` (captions as .txt
sidecars, which both read), batch size 1, LoRA rank `--rank`, AdamW, a constant learning rate, fp32 weights and compute
on CPU (`--cpu`: ComfyUI loads the model in fp32; `--precision bf16`: bf16 autocast in both, weights and LoRA still
fp32), gradient checkpointing as each node does by default
(`--checkpointing default`: the built-in node on, ours `auto`, i.e. the memory planner turns it off when the free
memory allows; `on`/`off` force it for both), no sampling. What each trains is its own default: ours puts LoRA on the
transformer blocks (kohya's targets), the built-in node on every weighted layer (plus bias/norm diffs).

Models (`--family`): `sd15` (default), a random-weight SD1.5 single file in the real layout (~1 B parameters,
tests/comfy_real_support/checkpoint.py) through CheckpointLoaderSimple; `flux` / `sd3`, the tiny Flux.1-dev / SD3
files of tests/test_comfy_real_flow.py (tests/comfy_real_support/flow_checkpoints.py: ~1 M-parameter diffusion model,
full-size 16-channel VAE, tiny text encoders) through UNETLoader, VAELoader and the test-only TinyCLIPLoader, which is
linked into the temporary custom_nodes for those families. On the tiny models a step is mostly each trainer's own
per-step overhead, not the model's arithmetic. `--flux-size mid` (or HIDDEN,DOUBLE,SINGLE) makes the Flux diffusion
model a mid-size one in the same layout (hidden 768, 3 double + 6 single blocks, ~120 M parameters, built by the
tests' `flux_state_dict` with those overrides and cached): there the arithmetic dominates a step (~1 s at 256 px on
2 cores). ComfyUI 0.12.3 and 0.33 both read Flux's hidden size from img_in/txt_in (3072 is only their fallback).

The built-in node's inputs are read from the server's /object_info (every input at its default, then the settings
above where the node has them), so the same bench runs on ComfyUI versions whose TrainLoraNode differ (0.33 added
`quantized_backward`, `checkpoint_depth`, `offloading`, …); the inputs used are printed and kept in the JSON.

Method (bench/README.md): each trainer gets a fresh ComfyUI server (python from COMFYUI_PYTHON or the checkout's
.venv) and runs its training prompt twice: a warm-up (`--warmup` steps: loads the model and, for the built-in node,
caches its dataset nodes), then the timed run (`--steps` steps, another seed so nothing comes from the cache). Both
nodes move ComfyUI's progress bar once per optimizer step; the bench listens on ComfyUI's websocket and takes the
median of (time between consecutive `progress` events of the training node) / (steps between them) as seconds per step
(ComfyUI may drop updates less than 0.1 s apart, so the step count comes from the events' values; loading, encoding
and saving are outside those intervals); with `--repeat N` the timed run is made N times and the one with the lowest
median is reported. Peak memory = the server process's peak resident set (VmHWM, reset through /proc/PID/clear_refs
just before the timed run; cross-checked by sampling VmRSS every 50 ms); "extra" is that peak minus the RSS just before
the run; "steps MB" is the largest VmRSS sample between the first and the last progress event (the training steps
alone: ours re-encodes its latents in every timed prompt, the built-in node's encoding node is cached); "over idle" is
the peak minus the fresh server's RSS before its first prompt (the same start for both). "s outside steps" is the
training node's time before its first step (planning, encoding, loading, set-up; from ComfyUI's `executing` event)
and after its last progress event (export, plot, applying the LoRA). A trainer whose prompt fails is reported as
failed with ComfyUI's error and where it was raised (the last frames of the server log's traceback, all of it in the
JSON), and the other one still runs. Prints a table and writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from comfy_real_support.server import (  # noqa: E402
    ComfyError,
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


class Graph:
    """The loader nodes of a model family and where MODEL, CLIP and VAE come from in them."""

    def __init__(self, family: str, nodes: dict, model: list, clip: list, vae: list, files: dict[str, list[Path]],
                 test_nodes: bool) -> None:
        self.family, self.nodes, self.model, self.clip, self.vae = family, nodes, model, clip, vae
        self.files, self.test_nodes = files, test_nodes


# --flux-size presets: hidden width (a multiple of 128: ComfyUI's rope axes fix 128 per head), double blocks, single
# blocks. `tiny` is the tests' file (flow_checkpoints.FLUX); `mid` is big enough that the model's arithmetic, not
# each node's per-step overhead, dominates a step on a CPU (~1-2 s/step fp32 at 256 px on 2 cores).
FLUX_SIZES = {"tiny": None, "mid": (768, 3, 6)}


def parse_flux_size(text: str) -> tuple[int, int, int] | None:
    """`tiny`, `mid` or `HIDDEN,DOUBLE,SINGLE` (e.g. 512,2,4) → None (the tests' tiny file) or (hidden, double,
    single)."""
    if text in FLUX_SIZES:
        return FLUX_SIZES[text]
    try:
        hidden, double, single = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: tiny, mid or HIDDEN,DOUBLE,SINGLE") from None
    if hidden <= 0 or hidden % 128 or double < 1 or single < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: hidden must be a positive multiple of 128 (ComfyUI's Flux rope "
                                         "axes fix one head per 128), at least 1 double and 1 single block")
    return hidden, double, single


def flux_file(size: tuple[int, int, int], seed: int = 0) -> Path:
    """A random-weight Flux.1-dev diffusion model (BFL layout) of `size` = (hidden, double, single), built by the
    tests' own `flux_state_dict` with those overrides (context/pooled widths stay those of the tiny text encoders)
    and cached beside the tests' files."""
    from comfy_real_support import flow_checkpoints as fc

    hidden, double, single = size
    over = {"hidden": hidden, "double": double, "single": single}
    started = time.perf_counter()
    path = fc._cached(f"loraloop-bench-flux1-dev-h{hidden}-d{double}-s{single}", ["flux", {**fc.FLUX, **over}, seed],
                      lambda: fc.flux_state_dict(seed, **over))
    print(f"Flux file {path.name} ({path.stat().st_size / MB:.0f} MB, {time.perf_counter() - started:.1f} s)",
          flush=True)
    return path


def make_graph(family: str, flux_size: tuple[int, int, int] | None = None) -> Graph:
    """The model files (built and cached on first use) and their loader nodes."""
    if family == "sd15":
        from comfy_real_support.checkpoint import sd15_checkpoint

        ckpt = sd15_checkpoint()
        nodes = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt.name}}}
        return Graph(family, nodes, ["ckpt", 0], ["ckpt", 1], ["ckpt", 2], {"checkpoints": [ckpt]}, False)
    from dataclasses import replace

    from comfy_real_support.flow_checkpoints import flow_family

    fam = flow_family(family)
    if family == "flux" and flux_size is not None:
        fam = replace(fam, model=flux_file(flux_size))
    return Graph(family, fam.loader_nodes(), ["unet", 0], ["clip", 0], ["vae", 0], fam.files, True)


def _default(node: str, name: str, entry: list) -> object:
    """An input's default as /object_info describes it: `default`, else a combo's first option."""
    kind, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list) and kind:
        return kind[0]
    if kind == "COMBO" and opts.get("options"):
        return opts["options"][0]
    raise SystemExit(f"{node}.{name} ({kind}) has no default and the bench does not set it; update the bench")


def _options(entry: list) -> list | None:
    kind, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
    if isinstance(kind, list):
        return kind
    return opts.get("options") if kind == "COMBO" else None


def node_inputs(object_info: dict, node: str, links: dict, settings: dict) -> dict:
    """Every input of `node` from the server's /object_info: `links` for connections, `settings` where the node has
    that input (a combo value it does not offer is left at its default), every other required input at its default."""
    if node not in object_info:
        raise SystemExit(f"{node} is not registered in this ComfyUI")
    spec = object_info[node]["input"]
    out = {}
    for part in ("required", "optional"):
        for name, entry in spec.get(part, {}).items():
            if name in links:
                out[name] = links[name]
            elif name in settings and (_options(entry) is None or settings[name] in _options(entry)):
                out[name] = settings[name]
            elif part == "required":
                out[name] = _default(node, name, entry)
    missing = [name for name in links if name not in out]
    if missing:
        raise SystemExit(f"{node} has no input {missing}; update the bench")
    return out


def _output(object_info: dict, node: str, name: str) -> int | None:
    names = [n.lower() for n in object_info[node].get("output_name", [])]
    return names.index(name) if name in names else None


def ours_prompt(graph: Graph, object_info: dict, steps: int, args: argparse.Namespace) -> dict:
    info = object_info["LoRALoop_TrainConfig"]["input"]
    config = {name: spec[1]["default"] for part in ("required", "optional") for name, spec in info.get(part, {}).items()
              if isinstance(spec[1], dict) and "default" in spec[1]}
    config.update(resolution=args.resolution, enable_bucket=False, min_bucket_reso=min(args.resolution, 256),
                  max_train_steps=steps,
                  lora_rank=args.rank, batch_size=1, accumulation_steps=1,
                  learning_rate=args.lr, lr_scheduler="constant", lr_warmup_steps=0, optimizer="adamw",
                  mixed_precision={"fp32": "no"}.get(args.precision, args.precision),
                  gradient_checkpointing={"default": "auto"}.get(args.checkpointing, args.checkpointing),
                  cache_latents=True,
                  seed=args.seed, sample_prompts="", sample_every_n_steps=0, save_every_n_steps=0,
                  save_every_n_epochs=0)
    return graph.nodes | {
        "data": {"class_type": "LoRALoop_LoadDataset", "inputs": {"folder": FOLDER, "recursive": False,
                                                                  "caption_extension": ".txt"}},
        "config": {"class_type": "LoRALoop_TrainConfig", "inputs": config},
        "train": {"class_type": "LoRALoop_TrainLoRA", "inputs": {
            "model": graph.model, "clip": graph.clip, "vae": graph.vae, "dataset": ["data", 0],
            "config": ["config", 0], "name": "bench", "save_on_cancel": False}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["train", 3]}},  # the loss plot: an output node
    }


def builtin_settings(steps: int, args: argparse.Namespace) -> dict:
    """What the bench sets on TrainLoraNode where the node has the input; the rest stays at the node's defaults."""
    return {"batch_size": 1, "grad_accumulation_steps": 1, "steps": steps, "learning_rate": args.lr,
            "rank": args.rank, "optimizer": "AdamW", "loss_function": "MSE", "seed": args.seed,
            "training_dtype": args.precision, "lora_dtype": "fp32", "algorithm": "LoRA",
            "gradient_checkpointing": args.checkpointing != "off", "existing_lora": "[None]", "bucket_mode": False,
            "bypass_mode": False, "offloading": False, "quantized_backward": False}


def builtin_prompt(graph: Graph, object_info: dict, steps: int, args: argparse.Namespace) -> dict:
    load = "LoadImageTextDataSetFromFolder"
    data = node_inputs(object_info, load, {}, {"folder": FOLDER})
    encode = node_inputs(object_info, "MakeTrainingDataset", {"images": ["data", 0], "texts": ["data", 1],
                                                              "vae": graph.vae, "clip": graph.clip}, {})
    train = node_inputs(object_info, "TrainLoraNode", {"model": graph.model, "latents": ["encode", 0],
                                                       "positive": ["encode", 1]}, builtin_settings(steps, args))
    steps_out = _output(object_info, "TrainLoraNode", "steps")
    save_links = {"lora": ["train", 0]} | ({"steps": ["train", steps_out]} if steps_out is not None else {})
    save = node_inputs(object_info, "SaveLoRA", save_links, {"prefix": "loras/bench_builtin"})
    return graph.nodes | {
        "data": {"class_type": load, "inputs": data},
        "encode": {"class_type": "MakeTrainingDataset", "inputs": encode},
        "train": {"class_type": "TrainLoraNode", "inputs": train},
        "out": {"class_type": "SaveLoRA", "inputs": save},
    }


class RssTimeline(RssSampler):
    """RssSampler that keeps every (perf_counter, RSS bytes) sample, to read the peak within a time window."""

    def __init__(self, server: ComfyServer, interval: float = 0.05) -> None:
        super().__init__(server, interval)
        self.timeline: list[tuple[float, int]] = []

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.server.rss()
            except (OSError, KeyError):
                return
            self.timeline.append((time.perf_counter(), rss))
            self.peak, self.samples = max(self.peak, rss), self.samples + 1
            self._stop.wait(self.interval)

    def peak_between(self, start: float, end: float) -> int | None:
        inside = [rss for t, rss in self.timeline if start <= t <= end]
        return max(inside) if inside else None


def executed_nodes(entry: dict) -> set[str]:
    """class types that ran (not cached) in a finished prompt."""
    prompt = entry["prompt"][2]
    return {prompt[n]["class_type"] for n in prompt if n not in cached_nodes(entry)}


def node_window(events: EventListener, prompt_id: str, node: str) -> tuple[float | None, float | None]:
    """(perf_counter when ComfyUI started executing `node`, when it moved on to the next node or finished) from the
    websocket's `executing` events (data.node is the node id, None once the prompt is done)."""
    with events._lock:
        mine = [(t, d) for t, _, kind, d in events.events if kind in ("executing", "execution_success")
                and isinstance(d, dict) and d.get("prompt_id") == prompt_id]
    start = next((i for i, (_, d) in enumerate(mine) if d.get("node") == node), None)
    if start is None:
        return None, None
    end = next((t for t, d in mine[start + 1:] if d.get("node") != node), None)
    return mine[start][0], end


TRAINERS = {"loraloop": ("LoRALoop_TrainLoRA", ours_prompt), "builtin": ("TrainLoraNode", builtin_prompt)}


def prepare(base: Path, graph: Graph, resolution: int) -> None:
    make_layout(base)
    for folder, paths in graph.files.items():  # models/<folder>/ under --base-directory: ComfyUI's default folders
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for path in paths:
            (base / "models" / folder / path.name).symlink_to(path)
    if graph.test_nodes:
        from comfy_real_support.flow_checkpoints import link_test_nodes

        link_test_nodes(base)
    folder = copy_dataset(ROOT / "cli" / "demo" / "dataset", base / "input" / FOLDER, resolution)
    with (folder / "metadata.csv").open(encoding="utf-8") as f:  # the built-in loader reads .txt sidecars only
        for row in csv.DictReader(f):
            (folder / (Path(row["filename"]).stem + ".txt")).write_text(row["prompt"], encoding="utf-8")


def step_rates(ticks: list[tuple[float, float, int]]) -> tuple[list[float], list[float], list[int]]:
    """(wall s/step, CPU s/step, steps) between consecutive progress events; updates ComfyUI dropped (less than 0.1 s
    apart) make one interval span several steps, counted by the events' values."""
    wall, cpu, spans = [], [], []
    for a, b in itertools.pairwise(ticks):
        if b[2] > a[2]:
            spans.append(b[2] - a[2])
            wall.append((b[0] - a[0]) / spans[-1])
            cpu.append((b[1] - a[1]) / spans[-1])
    return wall, cpu, spans


def bench_one(name: str, comfy_dir: Path, graph: Graph, args: argparse.Namespace) -> dict:
    node_id, make = TRAINERS[name]
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        base = Path(tmp)
        prepare(base, graph, args.resolution)
        server = ComfyServer(comfy_dir, base, extra_args=("--disable-api-nodes",))
        runs, error, inputs = [], None, None
        with server:
            info = server.get("/object_info")
            if node_id not in info:
                raise SystemExit(f"{node_id} is not registered in this ComfyUI")
            events = EventListener(server)
            for i, steps in enumerate((args.warmup, *[args.steps] * args.repeat)):
                before = server.rss()
                server.reset_peak_rss()
                # a new seed per run: an identical prompt would come from ComfyUI's cache in 0 s
                run_args = argparse.Namespace(**{**vars(args), "seed": args.seed + i})
                label = "warm-up" if i == 0 else f"timed #{i}"
                prompt = make(graph, info, steps, run_args)
                inputs = prompt["train"]["inputs"]
                if i == 0 and name == "builtin":
                    print(f"  builtin TrainLoraNode inputs: {json.dumps(inputs)}", flush=True)
                try:
                    with RssTimeline(server) as sampler:
                        queued = time.perf_counter()
                        prompt_id = server.queue(prompt, client_id=events.client_id)
                        entry = server.wait(prompt_id, timeout=args.timeout)
                        finished = time.perf_counter()
                except ComfyError as err:
                    found = re.search(r'"exception_message": "((?:[^"\\]|\\.)*)"', str(err))
                    error = (found.group(1) if found else str(err).split("\n", 1)[0])[:600]
                    print(f"  {name} {label} FAILED: {error}", flush=True)
                    break
                if node_id not in executed_nodes(entry):
                    raise SystemExit(f"{name}: the training node did not run in run {i} (cached?)")
                ticks = events.progress_times(prompt_id, "train")
                wall, cpu, spans = step_rates(ticks)
                texts = [t for out in entry.get("outputs", {}).values() for t in out.get("text", [])]
                plan = next((line.split(":", 1)[1].strip() for t in texts for line in t.splitlines()
                             if line.startswith("settings:")), None)  # ours: the memory plan's chosen settings
                # the training steps alone (from the first to the last progress event): no loading or encoding
                steps_peak = sampler.peak_between(ticks[0][0], ticks[-1][0]) if len(ticks) > 1 else None
                # the training node's time outside its steps: from its start to the first step's start (planning,
                # encoding, loading, set-up; the first step itself is taken out at the median rate) and from the last
                # progress event to the node's end (export, the preview or loss plot, applying the LoRA)
                node_start, node_end = node_window(events, prompt_id, "train")
                node_end = node_end or finished
                before_s = ((ticks[0][0] - (node_start or queued) - ticks[0][2] * statistics.median(wall))
                            if ticks and wall else None)
                after_s = node_end - ticks[-1][0] if ticks else None
                runs.append({"steps": steps, "seconds": execution_seconds(entry), "progress_events": len(ticks),
                             "wall_s": finished - queued, "node_s": (node_end - node_start) if node_start else None,
                             "before_steps_s": before_s, "after_steps_s": after_s,
                             "steps_peak_rss_mb": steps_peak / MB if steps_peak else None,
                             "last_progress_value": ticks[-1][2] if ticks else None, "plan_settings": plan,
                             "step_intervals_s": wall, "step_cpu_s": cpu, "interval_steps": spans,
                             "rss_before_mb": before / MB,
                             "peak_rss_mb": server.peak_rss() / MB, "sampled_peak_mb": sampler.peak / MB,
                             "load_avg_1min": os.getloadavg()[0]})
                outside = (f" ({before_s:.1f} s before the steps, {after_s:.1f} s after)"
                           if before_s is not None and wall else "")
                print(f"  {name} {label} ({steps} steps): {runs[-1]['seconds']:.1f} s{outside}, "
                      f"s/step between progress events {[round(x, 3) for x in wall]} "
                      f"(CPU {[round(x, 3) for x in cpu]}), peak RSS {runs[-1]['peak_rss_mb']:.0f} MB"
                      + (f" ({steps_peak / MB:.0f} MB during the steps)" if steps_peak else "") + ", "
                      f"load {runs[-1]['load_avg_1min']:.1f}" + (f"; plan: {plan}" if plan else ""), flush=True)
            events.close()
            log = server.log_text()
    if error is None and ("lora key not loaded" in log or "Traceback" in log):
        print(f"  warning: {name}: the server log has errors:\n{log[-3000:]}")
    result = {"trainer": name, "node": node_id, "runs": runs, "inputs": inputs, "error": error}
    if error is not None:
        # where it failed: the last traceback in the server's log (kept in the JSON, its last frames printed)
        trace = log[log.rfind("Traceback"):] if "Traceback" in log else ""
        result["error_traceback"] = trace[-6000:]
        frames = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
        if frames:
            print("  where: " + "\n         ".join(frames[-4:]), flush=True)
        return result
    for timed in runs[1:]:
        if timed["last_progress_value"] != args.steps or not timed["step_intervals_s"]:
            raise SystemExit(f"{name}: expected progress events up to step {args.steps}, got "
                             f"{timed['progress_events']} events ending at {timed['last_progress_value']}")
    # --repeat: the timed run with the lowest median (the least disturbed by other processes)
    timed = min(runs[1:], key=lambda r: statistics.median(r["step_intervals_s"]))
    return result | {"best_run": runs.index(timed),"s_per_step": statistics.median(timed["step_intervals_s"]),
                     "s_per_step_mean": statistics.fmean(timed["step_intervals_s"]),
                     "s_per_step_min": min(timed["step_intervals_s"]),
                     "cpu_s_per_step": statistics.median(timed["step_cpu_s"]),
                     "peak_rss_mb": timed["peak_rss_mb"], "sampled_peak_mb": timed["sampled_peak_mb"],
                     "extra_mb": timed["peak_rss_mb"] - timed["rss_before_mb"],
                     # the fresh server before its first prompt (nothing loaded): the same start for both trainers
                     "idle_rss_mb": runs[0]["rss_before_mb"],
                     "over_idle_mb": timed["peak_rss_mb"] - runs[0]["rss_before_mb"],
                     "warmup_peak_rss_mb": runs[0]["peak_rss_mb"],
                     "steps_peak_rss_mb": timed["steps_peak_rss_mb"],
                     "before_steps_s": timed["before_steps_s"], "after_steps_s": timed["after_steps_s"]}


def graph_size(size: tuple[int, int, int] | None) -> str:
    return f" (hidden {size[0]}, {size[1]} double + {size[2]} single blocks)" if size else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("sd15", "flux", "sd3"), default="sd15",
                   help="sd15: the random full-size SD1.5 checkpoint; flux/sd3: the tiny flow models of the tests")
    p.add_argument("--flux-size", type=parse_flux_size, default=None, metavar="tiny|mid|H,D,S",
                   help="--family flux: the Flux diffusion model's size. tiny (default): the tests' ~1 M-parameter "
                        "file (hidden 128, 1 double + 1 single block); mid: hidden 768, 3 double + 6 single blocks "
                        "(~120 M parameters); or HIDDEN,DOUBLE,SINGLE (hidden a multiple of 128)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="steps of the timed run (≥ 3: s/step is the median over the "
                   "intervals between its progress events)")
    p.add_argument("--warmup", type=int, default=1, help="steps of the untimed first run")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per trainer (another seed each); the one with the "
                   "lowest median s/step is reported (on a shared machine, the least disturbed one)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="compute dtype of both: fp32 (default; ours mixed_precision no, built-in training_dtype fp32) "
                        "or bf16 autocast (ours mixed_precision bf16, built-in training_dtype bf16); the weights stay "
                        "fp32 as ComfyUI loads them on CPU, the LoRA fp32 in both"),
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
    if args.steps < 3 or args.warmup < 1 or args.repeat < 1:
        p.error("--steps must be ≥ 3, --warmup and --repeat ≥ 1")
    comfy_dir = Path(os.environ.get("COMFYUI_DIR") or p.error("set COMFYUI_DIR")).resolve()

    if args.flux_size is not None and args.family != "flux":
        p.error("--flux-size is for --family flux")
    graph = make_graph(args.family, args.flux_size)
    version = (comfy_dir / "comfyui_version.py").read_text().split('"')[1]
    print(f"ComfyUI {version}, CPU, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"{args.family}{graph_size(args.flux_size)}, {args.resolution}px, rank {args.rank}, batch 1, "
          f"{args.warmup} + {args.repeat} x {args.steps} steps, {args.precision} compute (fp32 weights and LoRA), "
          f"gradient checkpointing {args.checkpointing}",
          flush=True)
    results = [bench_one(name, comfy_dir, graph, args) for name in (args.only or ["loraloop", "builtin"])]
    print(f"\n{'trainer':<10} {'s/step':>8} {'(min)':>7} {'CPU s/step':>11} {'peak RSS MB':>12} {'(sampled)':>10} "
          f"{'extra MB':>9} {'steps MB':>9} {'idle MB':>8} {'over idle':>10} {'s outside steps':>16}")
    for r in results:
        if r["error"] is not None:
            print(f"{r['trainer']:<10} FAILED: {r['error']}")
            continue
        print(f"{r['trainer']:<10} {r['s_per_step']:>8.3f} {r['s_per_step_min']:>7.3f} {r['cpu_s_per_step']:>11.3f} "
              f"{r['peak_rss_mb']:>12.0f} {r['sampled_peak_mb']:>10.0f} {r['extra_mb']:>9.0f} "
              f"{r['steps_peak_rss_mb'] or float('nan'):>9.0f} {r['idle_rss_mb']:>8.0f} {r['over_idle_mb']:>10.0f} "
              f"{r['before_steps_s']:>8.1f} +{r['after_steps_s']:>6.1f}")
    if len(results) == 2 and all(r["error"] is None for r in results):
        ours, builtin = results
        print(f"\nspeed-up {builtin['s_per_step'] / ours['s_per_step']:.2f}x wall (median), "
              f"{builtin['s_per_step_min'] / ours['s_per_step_min']:.2f}x wall (min), "
              f"{builtin['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}x CPU time; peak RSS "
              f"{ours['peak_rss_mb']:.0f} vs {builtin['peak_rss_mb']:.0f} MB "
              f"(extra {ours['extra_mb']:.0f} vs {builtin['extra_mb']:.0f} MB; over the idle server "
              f"{ours['over_idle_mb']:.0f} vs {builtin['over_idle_mb']:.0f} MB)")
    if args.json:
        files = {folder: [path.name for path in paths] for folder, paths in graph.files.items()}
        args.json.write_text(json.dumps({"comfyui": version, "args": {k: v for k, v in vars(args).items()
                                                                       if k != "json"},
                                         "model_files": files, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
