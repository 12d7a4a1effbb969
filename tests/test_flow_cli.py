"""Flow families on the command line: the built-in tiny Flux.1 / SD3 (diffusers' transformers), diffusers folders,
and the LoRA file diffusers' own loader reads."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraloop.trainer.bundles.checkpoint import load_checkpoint_bundle
from loraloop.trainer.bundles.tiny import build_tiny_bundle
from loraloop.trainer.config import TrainConfig
from loraloop.trainer.errors import ConfigError
from loraloop.trainer.loss import LossSettings, diffusion_loss, draw_noise
from loraloop.trainer.network import Network, NetworkSpec, applied_lora, spec_from_state_dict
from loraloop.trainer.progress import NullSink
from loraloop.trainer.runner import run

FLOW_MODELS = ["tiny-flux1", "tiny-sd3"]


@pytest.fixture(scope="module", params=FLOW_MODELS)
def flow_bundle(request):
    return build_tiny_bundle(request.param)


def _inputs(bundle, n=1):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 16, 8, 8, generator=gen), torch.rand(n, generator=gen) * 0.8 + 0.1, \
        bundle.encode_text(["flatstyle, a cat"] * n)


def test_loss_falls_on_a_fixed_batch(flow_bundle):
    """One latent, fixed noise and σ: 40 AdamW steps on the adapters must take the flow loss down by 30%."""
    latents = flow_bundle.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
    cond = flow_bundle.encode_text(["flatstyle, a cat"])
    draw = draw_noise(latents.shape, torch.Generator().manual_seed(0), LossSettings(), 0, flow=True)
    losses = []
    with Network(flow_bundle, NetworkSpec(rank=4, alpha=4)) as network:
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
        for _ in range(40):
            loss = diffusion_loss(flow_bundle, latents, cond, draw, LossSettings())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_diffusers_loads_the_lora_and_reproduces_the_adapted_forward(flow_bundle, tmp_path):
    """The saved file (`transformer.<path>.lora_A/lora_B`, alpha/rank baked into B) through diffusers' own LoRA loader
    for the family gives the output our adapted model gives, alpha ≠ rank included."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin, SD3LoraLoaderMixin

    x, sigma, cond = _inputs(flow_bundle)
    torch.manual_seed(0)
    with torch.no_grad():
        base = flow_bundle.predict(x, sigma, cond)
        with Network(flow_bundle, NetworkSpec(rank=4, alpha=2)) as network:
            for p in network.parameters():
                torch.nn.init.normal_(p, std=0.05)
            adapted = flow_bundle.predict(x, sigma, cond)
            tensors = network.state_dict(torch.float32)
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    loader = FluxLoraLoaderMixin if flow_bundle.family.name == "flux1" else SD3LoraLoaderMixin
    state = loader.lora_state_dict(str(path))
    state = state[0] if isinstance(state, tuple) else state  # Flux's returns (state, alphas)
    flow_bundle.unet.load_lora_adapter(state, prefix="transformer", adapter_name="check")
    try:
        with torch.no_grad():
            theirs = flow_bundle.predict(x, sigma, cond)
    finally:
        flow_bundle.unet.unload_lora()
    assert (adapted - base).abs().max() > 1e-3
    assert torch.allclose(theirs, adapted, atol=1e-4), (theirs - adapted).abs().max()
    with torch.no_grad():  # the bundle is itself again
        assert torch.equal(flow_bundle.predict(x, sigma, cond), base)
    # our own loader reads it back the same
    with torch.no_grad(), applied_lora(flow_bundle, spec_from_state_dict(tensors, NetworkSpec()), tensors):
        assert torch.allclose(flow_bundle.predict(x, sigma, cond), adapted, atol=1e-5)


def test_the_command_line_trains_a_flux_lora_and_continues_it(demo_dataset, tmp_path):
    config = TrainConfig(base_model="builtin:tiny-flux1", train_data_dir=str(demo_dataset), resolution=64,
                         max_train_steps=3, output_dir=str(tmp_path / "out"), output_name="fx",
                         sample_prompts=["flatstyle, a cat"], sample_steps=2, sample_every_n_steps=3)
    outputs = run(config, NullSink())
    with safe_open(str(outputs.lora), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert outputs.samples is not None and outputs.samples.is_file()
    more = TrainConfig(**{**config.to_dict(), "output_name": "fx2", "resume_lora": str(outputs.lora),
                          "sample_prompts": []})
    again = run(more, NullSink())
    assert again.result.steps == 3 and again.lora.is_file()
    with pytest.raises(ConfigError, match="train_text_encoder: the command line trains the flux1 transformer only"):
        run(TrainConfig(**{**config.to_dict(), "output_name": "fx3", "train_text_encoder": True}), NullSink())


@pytest.mark.parametrize("name", FLOW_MODELS)
def test_diffusers_folders_load_offline(name, tmp_path):
    """A FluxPipeline / StableDiffusion3Pipeline folder loads with its own tokenizers, family and shift detected."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    bundle = build_tiny_bundle(name)
    tes = [slot.module for slot in bundle.text_encoders]
    toks = bundle.tokenizers
    if name == "tiny-flux1":
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        pipe = FluxPipeline(scheduler=scheduler, vae=bundle.vae, text_encoder=tes[0], tokenizer=toks[0],
                            text_encoder_2=tes[1], tokenizer_2=toks[1], transformer=bundle.unet)
    else:
        pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=bundle.vae,
                                        text_encoder=tes[0], tokenizer=toks[0], text_encoder_2=tes[1],
                                        tokenizer_2=toks[1], text_encoder_3=tes[2], tokenizer_3=toks[2],
                                        transformer=bundle.unet)
    pipe.save_pretrained(str(tmp_path / name))
    loaded = load_checkpoint_bundle(tmp_path / name)
    assert loaded.family.name == bundle.family.name
    assert loaded.shift == pytest.approx(bundle.shift)
    x, sigma, _ = _inputs(bundle)
    with torch.no_grad():
        ours = loaded.predict(x, sigma, loaded.encode_text(["a cat"]))
        reference = bundle.predict(x, sigma, bundle.encode_text(["a cat"]))
    assert torch.allclose(ours, reference, atol=1e-5)
    with pytest.raises(Exception, match="detected as"):
        load_checkpoint_bundle(tmp_path / name, family="sdxl")


def test_fp8_base_weights_train_like_the_plain_run(demo_dataset, tmp_path):
    """`base_weight_dtype: fp8`: the transformer's adapted Linears hold float8_e4m3fn weights (a quarter of fp32's
    bytes), and training on them follows the full-precision run: the same seed gives losses within 5% and adapters
    pointing the same way (cosine > 0.95; fp8 rounds each weight to 3 mantissa bits)."""
    base = dict(base_model="builtin:tiny-flux1", train_data_dir=str(demo_dataset), resolution=64, max_train_steps=6,
                learning_rate=5e-3, sample_prompts=[], lr_scheduler="constant")
    plain = run(TrainConfig(**base, output_dir=str(tmp_path / "plain"), output_name="p"), NullSink(),
                bundle=build_tiny_bundle("tiny-flux1"))
    fp8_bundle = build_tiny_bundle("tiny-flux1")
    low = run(TrainConfig(**base, output_dir=str(tmp_path / "fp8"), output_name="q", base_weight_dtype="fp8"),
              NullSink(), bundle=fp8_bundle)
    linears = [m for m in fp8_bundle.unet.modules() if isinstance(m, torch.nn.Linear) and hasattr(m, "fp8_scale")]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    a, b = plain.result.losses, low.result.losses
    assert all(abs(x - y) <= 0.05 * x for x, y in zip(a, b, strict=True)), (a, b)
    # lora_B starts at zero: what it holds is what training learned (lora_A's shared random start would flatter)
    ups = sorted(k for k in plain.result.state_dict if k.endswith(".lora_B.weight"))
    flat = [torch.cat([r.result.state_dict[k].flatten().float() for k in ups]) for r in (plain, low)]
    assert flat[0].abs().max() > 0 and torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.95


def test_a_single_file_flux_transformer_needs_components_from_and_says_so(tmp_path):
    """flux1-dev.safetensors-style files hold the transformer only (BFL key layout): without `components_from` the
    error names the key and what to give; a folder that is not a flow pipeline, and a file whose size does not fit
    the folder's transformer, are errors that say so (loading and training them: tests/test_flow_single_file.py)."""
    import sys
    from pathlib import Path

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from safetensors.torch import save_file as save

    from loraloop.trainer.errors import LoraLoopError

    sys.path.insert(0, str(Path(__file__).parent))
    from comfy_real_support.flow_checkpoints import flux_state_dict  # BFL's layout, written key by key

    tiny = build_tiny_bundle("tiny-flux1")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=tiny.vae,
                        text_encoder=tiny.text_encoders[0].module, tokenizer=tiny.tokenizers[0],
                        text_encoder_2=tiny.text_encoders[1].module, tokenizer_2=tiny.tokenizers[1],
                        transformer=tiny.unet)
    pipe.save_pretrained(str(tmp_path / "flux-folder"))
    file = tmp_path / "my-flux-finetune.safetensors"
    save({k: v.contiguous() for k, v in flux_state_dict(seed=3).items()}, str(file))
    with pytest.raises(LoraLoopError, match="set components_from to that family's diffusers folder"):
        load_checkpoint_bundle(file)
    with pytest.raises(LoraLoopError, match="is not a diffusers folder"):
        load_checkpoint_bundle(file, components_from=str(tmp_path))
    with pytest.raises(LoraLoopError, match=r"is 128 wide .* give the diffusers folder of the same model"):
        load_checkpoint_bundle(file, components_from=str(tmp_path / "flux-folder"))
