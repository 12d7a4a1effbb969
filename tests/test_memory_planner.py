"""The planner on a table of (free memory, family, dataset, effective batch) cases with the expected decisions."""

from __future__ import annotations

import pytest

from loraloop.trainer.config import PLANNABLE, TrainConfig
from loraloop.trainer.memory import GIB, DatasetFacts, ModelInfo, PlanRequest, make_plan, with_memory
from loraloop.trainer.memory.estimation.devices import DEVICES
from loraloop.trainer.memory.planning.planner import divisors

ALL = frozenset(PLANNABLE)


@pytest.fixture(scope="module")
def infos():
    return {f: ModelInfo.for_family(f) for f in ("sd1", "sdxl")}


def plan(infos, family, resolution, gb, *, batch=1, accumulation=1, rank=8, auto=ALL, facts=None, resident=False,
         **config):
    cfg = TrainConfig(family=family, resolution=resolution, batch_size=batch, accumulation_steps=accumulation,
                      lora_rank=rank, **config)
    request = PlanRequest(infos[family], with_memory(DEVICES["rtx 3090"], gb), int(gb * GIB), frozenset(auto),
                          facts or DatasetFacts(), weights_resident=resident)
    return make_plan(cfg, request)


# (family, resolution, effective batch, rank, GB free) → (batch, accumulation, chunk, checkpointing, resolution, rank)
TABLE = [
    ("sd1", 512, 1, 8, 4, (1, 1, None, False, 512, 8)),  # issue target: SD1.5 512 fits 4 GB
    ("sd1", 512, 4, 8, 4, (4, 1, None, True, 512, 8)),  # checkpointing beats 4 chunks of 1
    ("sd1", 512, 4, 8, 6, (4, 1, 2, False, 512, 8)),  # 2 chunks of 2 without recompute is fastest
    ("sd1", 512, 4, 8, 8, (4, 1, None, False, 512, 8)),  # all fits
    ("sd1", 768, 4, 8, 6, (4, 1, 1, False, 768, 8)),
    ("sdxl", 1024, 1, 16, 8, (1, 1, None, True, 1024, 16)),  # issue target: SDXL 1024 fits 8 GB
    ("sdxl", 1024, 4, 16, 8, (4, 1, 2, True, 1024, 16)),
    ("sdxl", 1024, 4, 16, 16, (4, 1, 1, False, 1024, 16)),
    # rank↓ last, then the highest resolution that fits (the text encoders cache on the CPU: 6 GB holds rank 8)
    ("sdxl", 1024, 1, 16, 6, (1, 1, None, True, 576, 8)),
]


class TestDecisionTable:
    @pytest.mark.parametrize(("family", "resolution", "effective", "rank", "gb", "expected"), TABLE)
    def test_case(self, infos, family, resolution, effective, rank, gb, expected):
        p = plan(infos, family, resolution, gb, batch=effective, rank=rank)
        s = p.shape
        assert p.fits and p.memory.peak <= p.budget_bytes
        assert (s.batch_size, s.accumulation_steps, p.chunk_size, s.gradient_checkpointing, p.resolution,
                s.lora_rank) == expected
        assert s.batch_size * s.accumulation_steps == effective
        assert s.mixed_precision == "bf16"  # a 3090 has bf16; half precision halves weights and is faster

    def test_every_change_has_a_reason_with_numbers(self, infos):
        p = plan(infos, "sdxl", 1024, 8)
        keys = {c.key for c in p.changes}
        assert keys == {"gradient_checkpointing", "mixed_precision"}
        reason = next(c.reason for c in p.changes if c.key == "gradient_checkpointing")
        assert "with gradient_checkpointing=False the peak would be" in reason and "GB usable" in reason


class TestConstraints:
    def test_effective_batch_is_kept_when_batch_is_auto(self, infos):
        """E = 6 on a tight card: batch × accumulation is still 6."""
        p = plan(infos, "sdxl", 1024, 10, batch=3, accumulation=2)
        assert p.fits and p.shape.effective_batch == 6

    def test_fixed_keys_are_respected(self, infos):
        """Nothing auto: the plan is the user's config, and it says it does not fit."""
        p = plan(infos, "sdxl", 1024, 8, auto=frozenset())
        assert not p.fits and p.changes == ()
        assert "nothing fits" in p.advice and "allow auto for" in p.advice

    def test_fixed_batch_uses_chunks_not_accumulation(self, infos):
        """With batch_size fixed, the plan keeps the batch (data order) and splits it into chunks."""
        p = plan(infos, "sd1", 512, 6, batch=4, auto=ALL - {"batch_size", "accumulation_steps"})
        assert (p.shape.batch_size, p.shape.accumulation_steps, p.chunk_size) == (4, 1, 2)

    def test_nothing_fits_gives_advice_with_numbers(self, infos):
        p = plan(infos, "sdxl", 1024, 4)
        assert not p.fits
        assert p.advice.startswith("nothing fits: the leanest plan needs")

    def test_host_resident_weights_are_not_counted(self, infos):
        """Inside a host the model already sits on the GPU: 2.5 GB free beside it is enough for SDXL with GC."""
        p = plan(infos, "sdxl", 1024, 2.5, resident=True)
        assert p.fits and p.shape.gradient_checkpointing and p.memory.parts["weights_unet"] == 0

    def test_dataset_buckets_drive_the_peak(self, infos):
        """A dataset whose largest bucket is smaller than the square needs less memory."""
        square = plan(infos, "sd1", 512, 24, batch=4)
        small = plan(infos, "sd1", 512, 24, batch=4, facts=DatasetFacts(max_bucket=(384, 448), mean_area=384 * 448))
        assert small.memory.peak < square.memory.peak
        assert small.time.seconds_per_step < square.time.seconds_per_step

    def test_text_encoder_training_keeps_encoders_resident(self, infos):
        p = plan(infos, "sd1", 512, 8, train_text_encoder=True)
        assert p.fits and not p.shape.cache_text and p.memory.parts["weights_text_encoders"] > 0

    def test_apply_sets_the_config(self, infos):
        p = plan(infos, "sdxl", 1024, 6)
        config = p.apply(TrainConfig(family="sdxl", resolution=1024, lora_rank=8))
        assert (config.resolution, config.lora_rank, config.gradient_checkpointing, config.mixed_precision) == \
            (p.resolution, p.shape.lora_rank, True, "bf16")

    def test_apply_lets_bucket_limits_follow_a_lower_resolution(self, infos):
        """SDXL at 6 GB drops to 576 px: derived limits follow it; explicit ones it contradicts are re-derived."""
        p = plan(infos, "sdxl", 1024, 6, rank=16)
        assert p.resolution == 576
        derived = p.apply(TrainConfig(family="sdxl", resolution=1024, lora_rank=16))
        assert derived.max_bucket_reso is None
        assert derived.bucket_limits() == {"min_bucket_reso": 256, "max_bucket_reso": 1152, "bucket_reso_steps": 64}
        explicit = p.apply(TrainConfig(family="sdxl", resolution=1024, lora_rank=16, min_bucket_reso=768,
                                       max_bucket_reso=2048))
        assert (explicit.min_bucket_reso, explicit.max_bucket_reso) == (None, 1152)

    def test_plan_reports_eta_and_json(self, infos):
        p = plan(infos, "sd1", 512, 8)
        from dataclasses import replace

        p = replace(p, total_steps=1000)
        assert p.eta_seconds == pytest.approx(1000 * p.time.seconds_per_step)
        data = p.to_dict()
        assert data["fits"] and data["settings"]["mixed_precision"] == "bf16" and data["total_steps"] == 1000
        assert any(line.startswith("total:") for line in p.lines())


def test_divisors():
    assert divisors(12) == [12, 6, 4, 3, 2, 1]


def test_fit_advice_names_settings_and_memory():
    """The give-up message's "what would fit" line, from a plan with every key auto."""
    from loraloop.trainer.memory import fit_advice

    text = fit_advice(TrainConfig(family="sdxl", base_model="model.safetensors", resolution=1024), free=8 * GIB)
    assert "resolution" in text and "GB" in text


class TestTextCache:
    """`cache_text_encoder_outputs`: the planner's `cache_text` lever reads and writes the config field."""

    def test_explicit_off_is_kept_when_not_auto(self, infos):
        """The user's `false` (key not in auto) stays: text encoders resident, no change, apply keeps false."""
        p = plan(infos, "sd1", 512, 8, auto=ALL - {"cache_text_encoder_outputs"}, cache_text_encoder_outputs=False)
        assert p.fits and not p.shape.cache_text and p.memory.parts["weights_text_encoders"] > 0
        assert "cache_text_encoder_outputs" not in {c.key for c in p.changes}
        config = p.apply(TrainConfig(family="sd1", cache_text_encoder_outputs=False))
        assert config.cache_text_encoder_outputs is False

    def test_auto_turns_it_on_and_says_why(self, infos):
        """In auto the planner caches whenever captions allow: a change with a reason, and apply writes it."""
        p = plan(infos, "sd1", 512, 8, cache_text_encoder_outputs=False)
        change = next(c for c in p.changes if c.key == "cache_text_encoder_outputs")
        assert (change.old, change.new) == (False, True)
        assert change.reason.startswith("encodes every caption once; the text encoders leave the device")
        assert p.shape.cache_text and p.memory.parts["weights_text_encoders"] == 0
        assert p.apply(TrainConfig(family="sd1", cache_text_encoder_outputs=False)).cache_text_encoder_outputs

    def test_dynamic_captions_rule_it_out_without_rewriting_the_switch(self, infos):
        """Shuffled captions cannot be cached: the shape says so, the user's `true` stays in the applied config."""
        p = plan(infos, "sd1", 512, 8, shuffle_caption=True)
        assert not p.shape.cache_text
        assert "cache_text_encoder_outputs" not in {c.key for c in p.changes}
        assert p.apply(TrainConfig(family="sd1", shuffle_caption=True)).cache_text_encoder_outputs is True

    def test_run_shape_from_config_reads_the_field(self):
        from loraloop.trainer.memory import RunShape

        assert RunShape.from_config(TrainConfig(), "sd1").cache_text
        assert not RunShape.from_config(TrainConfig(cache_text_encoder_outputs=False), "sd1").cache_text


# The tier table of `loraloop plan` for the families issue 13 names (generic GPU, rank 16, peaks to 0.5 GB). Published
# figures it should stay near: Qwen-Image bf16 42 GB (musubi-tuner), Flux.1 dev needs fp8 weights for 24 GB (kohya),
# SDXL 1024 about 6 GB, SD1.5 512 about 3 GB. A change to the estimate that moves a row fails here: update on purpose.
TIER_SNAPSHOT = {
    "flux1": [(8, "bf16", True, 6.5, 52), (12, "bf16", True, 9.5, 44), (16, "bf16", True, 12.5, 36),
              (24, "bf16", True, 20.5, 16), (48, "bf16", True, 26.0, 0), (8, "fp8", True, 6.5, 44),
              (12, "fp8", True, 10.0, 28), (16, "fp8", True, 13.5, 8), (24, "fp8", True, 15.0, 0),
              (48, "fp8", True, 15.0, 0)],
    "qwen-image": [(8, "bf16", True, 6.5, 60), (12, "bf16", True, 9.0, 56), (16, "bf16", True, 11.5, 52),
                   (24, "bf16", True, 19.0, 40), (48, "bf16", True, 41.5, 4), (8, "fp8", True, 6.0, 60),
                   (12, "fp8", True, 9.5, 48), (16, "fp8", True, 13.5, 36), (24, "fp8", True, 21.0, 12),
                   (48, "fp8", True, 24.0, 0)],
    "sdxl": [(8, "bf16", True, 6.5, 0), (12, "bf16", True, 6.5, 0), (16, "bf16", True, 6.5, 0),
             (24, "bf16", True, 14.5, 0), (48, "bf16", True, 14.5, 0), (8, "fp8", True, 4.5, 0),
             (12, "fp8", True, 4.5, 0), (16, "fp8", True, 12.0, 0), (24, "fp8", True, 12.0, 0),
             (48, "fp8", True, 12.0, 0)],
    "sd1": [(8, "bf16", True, 3.0, 0), (12, "bf16", True, 3.0, 0), (16, "bf16", True, 3.0, 0),
            (24, "bf16", True, 3.0, 0), (48, "bf16", True, 3.0, 0), (8, "fp8", True, 2.5, 0),
            (12, "fp8", True, 2.5, 0), (16, "fp8", True, 2.5, 0), (24, "fp8", True, 2.5, 0),
            (48, "fp8", True, 2.5, 0)],
}


@pytest.mark.parametrize("family", sorted(TIER_SNAPSHOT))
def test_the_tier_table_is_stable(family):
    from loraloop.trainer.memory import GENERIC_GPU, ModelInfo
    from loraloop.trainer.memory.planning.tiers import format_tiers, tier_table

    resolution = 512 if family == "sd1" else 1024
    config = TrainConfig(family=family, resolution=resolution, lora_rank=16, cache_latents=True).validate()
    rows = tier_table(config, ModelInfo.for_family(family), GENERIC_GPU, tiers=(8, 12, 16, 24, 48))
    assert [(r.vram_gb, r.weights, r.fits, round(r.peak_gb * 2) / 2, r.swapped) for r in rows] == \
        TIER_SNAPSHOT[family]
    text = "\n".join(format_tiers(rows))
    assert ("blocks swapped" in text) == (family in ("flux1", "qwen-image"))


def test_plan_prints_the_tier_table(capsys):
    from loraloop.cli import main

    code = main(["plan", "--family", "flux1", "--resolution", "1024", "--vram-gb", "8", "--rank", "16"])
    out = capsys.readouterr().out
    assert code == 0 and "VRAM tiers" in out and "24 GB  fp8" in out
    assert "blocks_to_swap: 0 → 52" in out and "fits" in out.split("estimated peak:")[1].splitlines()[0]
    assert "s of transfers per step, overlapped with the compute" in out
