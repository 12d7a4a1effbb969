"""Where a LoRA Loop training step on a Flux.1 model goes, inside a REAL ComfyUI (in-process, CPU, fp32).

    COMFYUI_DIR=/path/to/ComfyUI <ComfyUI's python> bench/flux_step_profile.py --flux-size mid
    COMFYUI_DIR=/path/to/ComfyUI <ComfyUI's python> bench/flux_step_profile.py --flux-size tiny --steps 20

Companion of comfy_vs_builtin.py (which measures the two nodes end to end through a ComfyUI server): this loads the
same random-weight Flux.1-dev file (bench/comfy_vs_builtin.py `--flux-size`, built by
tests/comfy_real_support/flow_checkpoints.py) through ComfyUI's own `load_diffusion_model_state_dict` (what
UNETLoader calls), wraps it in LoRA Loop's `ComfyBundle`, and times, on one fixed latent and conditioning (a 256-token
T5 context, as ComfyUI's Flux text encoder pads it, and a pooled vector):

- `forward (no grad)`: one forward of the model: the unit the rest is measured in;
- `bare fwd+bwd`: forward + backward of the frozen model (gradient w.r.t. the input only, no LoRA, no optimizer): the
  arithmetic floor of any LoRA step that trains every block;
- `ours`: LoRA Loop's step (peft LoRA on kohya's targets, rank `--rank`, AdamW), gradient checkpointing off (what the
  memory planner chose in the bench);
- `ours, ckpt per block`: the same with LoRA Loop's checkpointing (every transformer block);
- `ours, ckpt whole model`: the same with the whole diffusion model under one `torch.utils.checkpoint`, which is what
  ComfyUI's TrainLoraNode does with its defaults (`gradient_checkpointing` on, `checkpoint_depth` 1:
  `find_modules_at_depth(diffusion_model, 1)` returns the diffusion model itself);
- `ours, ComfyUI attention`: ckpt off, but ComfyUI's own CPU attention (sub-quadratic) instead of the SDPA override;
- `ours, bf16 autocast`: ckpt off, under `torch.autocast("cpu", bfloat16)` (what `mixed_precision bf16` does);

then a torch.profiler table of one `ours` step by operator. The median of `--steps` steps after 2 warm-up steps each.
Set `torch.set_num_threads` with `--threads` (default: torch's).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def _import_loraloop() -> None:
    """This checkout as `loraloop` (as tests/conftest.py does), whatever the folder is called."""
    if "loraloop" in sys.modules or importlib.util.find_spec("loraloop") is not None:
        return
    spec = importlib.util.spec_from_file_location("loraloop", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["loraloop"] = module
    spec.loader.exec_module(module)


def main() -> None:
    from comfy_vs_builtin import FLUX_SIZES, parse_flux_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flux-size", type=parse_flux_size, default=FLUX_SIZES["mid"], metavar="tiny|mid|H,D,S")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=256, help="T5 context length (ComfyUI pads Flux's T5 to 256)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", action="append", help="run only these cases (repeatable; names as printed)")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    comfy_dir = Path(os.environ.get("COMFYUI_DIR") or p.error("set COMFYUI_DIR")).resolve()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    _import_loraloop()
    from comfy_real_support import flow_checkpoints as fc
    from comfy_real_support.families import import_comfy

    import_comfy(comfy_dir)
    import comfy.sd

    from loraloop.nodes.bundle import ComfyBundle
    from loraloop.trainer.bundle import Conditioning
    from loraloop.trainer.checkpointing import gradient_checkpointing
    from loraloop.trainer.loss import LossSettings, diffusion_loss, draw_noise
    from loraloop.trainer.network import Network, NetworkSpec

    over = {} if args.flux_size is None else dict(zip(("hidden", "double", "single"), args.flux_size, strict=True))
    sd = fc.flux_state_dict(0, **over)
    with torch.inference_mode():  # as a prompt loads it: inference tensors
        patcher = comfy.sd.load_diffusion_model_state_dict({k: v.float() for k, v in sd.items()})
    del sd
    unet = patcher.model.diffusion_model
    n_params = sum(t.numel() for t in unet.parameters())
    version = (comfy_dir / "comfyui_version.py").read_text().split('"')[1]
    cfg = {**fc.FLUX, **over}
    print(f"ComfyUI {version}; Flux hidden {cfg['hidden']}, {cfg['double']} double + {cfg['single']} single blocks, "
          f"{n_params / 1e6:.1f} M parameters; {args.resolution} px ({(args.resolution // 16) ** 2} image tokens) + "
          f"{args.text_tokens} text tokens; rank {args.rank}; {torch.get_num_threads()} threads; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    bundle = ComfyBundle(patcher, None, None)
    gen = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, args.text_tokens, int(cfg["context"]), generator=gen),
                        torch.randn(1, int(cfg["pooled"]), generator=gen), torch.tensor([args.text_tokens]))
    latents = torch.randn(1, 16, args.resolution // 8, args.resolution // 8, generator=gen)
    settings = LossSettings()
    draw = draw_noise(latents.shape, gen, settings, 1000, flow=True)
    override = bundle._attention_override

    @contextlib.contextmanager
    def whole_model_checkpoint():
        """TrainLoraNode's `patch(diffusion_model)`: the whole model's forward under one non-reentrant checkpoint."""
        original = unet.forward

        def fwd(*a, **k):
            return torch.utils.checkpoint.checkpoint(original, *a, use_reentrant=False, **k)

        unet.forward = fwd
        try:
            yield
        finally:
            del unet.forward

    def timed(name: str, step, setup=contextlib.nullcontext) -> float | None:
        if args.only and name not in args.only:
            return None
        times = []
        with setup():
            for i in range(args.steps + 2):
                start = time.perf_counter()
                step()
                if i >= 2:
                    times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(f"  {name:<28} {median:7.3f} s  (min {min(times):.3f}; {' '.join(f'{t:.3f}' for t in times)})",
              flush=True)
        return median

    results: dict[str, float | None] = {}
    with torch.inference_mode(False), bundle.trainable():
        def forward() -> None:
            with torch.no_grad():
                diffusion_loss(bundle, latents, cond, draw, settings)

        def bare() -> None:
            x = latents.clone().requires_grad_(True)
            diffusion_loss(bundle, x, cond, draw, settings).backward()

        results["forward (no grad)"] = timed("forward (no grad)", forward)
        results["bare fwd+bwd"] = timed("bare fwd+bwd", bare)
        with Network(bundle, NetworkSpec(rank=args.rank, alpha=args.rank)) as net:
            params = net.parameters()
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            print(f"  ({len(net.names)} LoRA modules, {sum(p.numel() for p in params) / 1e6:.2f} M LoRA parameters)")

            def ours() -> None:
                diffusion_loss(bundle, latents, cond, draw, settings).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            results["ours"] = timed("ours", ours)
            results["ours, ckpt per block"] = timed("ours, ckpt per block", ours,
                                                    lambda: gradient_checkpointing(bundle.unet, True))
            results["ours, ckpt whole model"] = timed("ours, ckpt whole model", ours, whole_model_checkpoint)

            @contextlib.contextmanager
            def comfy_attention():
                bundle._attention_override = None
                try:
                    yield
                finally:
                    bundle._attention_override = override

            results["ours, ComfyUI attention"] = timed("ours, ComfyUI attention", ours, comfy_attention)
            results["ours, bf16 autocast"] = timed("ours, bf16 autocast", ours,
                                                   lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            base = results["forward (no grad)"]
            if base:
                print("  in forwards: " + ", ".join(f"{k} {v / base:.2f}" for k, v in results.items() if v))
            if not args.no_profile:
                from torch.profiler import ProfilerActivity, profile

                ours()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    ours()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))


if __name__ == "__main__":
    main()
