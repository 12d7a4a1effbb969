"""A LoRA trained by the engine, saved in kohya format, loads in diffusers and reproduces the engine's outputs."""

import pytest
import torch
from test_loop import batches_for, config_for

from loraloop.trainer.lorafile import load_lora, save_lora
from loraloop.trainer.network import Network

# fp16 storage rounds each adapter weight to 11 bits; on these tiny models that moves outputs by ~1e-4 at most.
FP16_TOL = 1e-3
FP32_TOL = 1e-5


def diffusers_pipeline(bundle):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if bundle.family.is_sdxl:
        return StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0].module,
                                         text_encoder_2=bundle.text_encoders[1].module,
                                         tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1],
                                         unet=bundle.unet, scheduler=DDIMScheduler())
    return StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0].module,
                                   tokenizer=bundle.tokenizers[0], unet=bundle.unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize(("bundle_name", "save_precision", "tol"), [
    ("tiny_sd1", "fp16", FP16_TOL), ("tiny_sd1", "fp32", FP32_TOL), ("tiny_sdxl", "fp16", FP16_TOL)])
def test_engine_lora_loads_in_diffusers(request, demo_dataset, tmp_path, bundle_name, save_precision, tol):
    bundle = request.getfixturevalue(bundle_name)
    from loraloop.trainer.loop import train

    config = config_for(demo_dataset, max_train_steps=3, learning_rate=1e-2, train_text_encoder=True,
                        network_type="locon", conv_rank=2, conv_alpha=1, save_precision=save_precision)
    result = train(bundle, batches_for(bundle, config), config)
    path = save_lora(tmp_path / "lora.safetensors", result.state_dict, result.metadata)
    _tensors, metadata = load_lora(path)
    assert metadata["ss_base_model_version"] == bundle.family.ss_base_model_version
    assert metadata["ss_network_module"] == "networks.lora"

    latents, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 700])
    prompts = ["flat style, a red circle", "a green square"]
    # The engine's in-memory adapted model: the float32 adapter weights as trained (the file may hold fp16).
    with torch.no_grad(), Network(bundle, result.spec) as net:
        net.load_state_dict(result.train_state.adapter)
        want_cond = bundle.encode_text(prompts)
        want = bundle.predict(latents, t, want_cond)

    pipe = diffusers_pipeline(bundle)
    pipe.load_lora_weights(str(path), adapter_name="engine")
    try:
        with torch.no_grad():
            got_cond = bundle.encode_text(prompts)
            got = bundle.predict(latents, t, got_cond)
        assert (got_cond.context - want_cond.context).abs().max().item() < tol
        assert (got - want).abs().max().item() < tol
        # and the LoRA really changes the model
        pipe.set_adapters(["engine"], [0.0])
        with torch.no_grad():
            base = bundle.predict(latents, t, bundle.encode_text(prompts))
        assert (base - want).abs().max().item() > 10 * tol
    finally:
        pipe.unload_lora_weights()
