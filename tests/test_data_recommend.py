"""Recommendations from the dataset (trainer/data/recommend.py): caption style, resolution, rank, steps and learning
rate, each with a reason."""

from __future__ import annotations

from loraloop.trainer.data.recommend import DatasetStats, caption_style, recommend


def by_key(recs):
    return {r.key: r for r in recs}


class TestCaptionStyle:
    def test_tags(self):
        assert caption_style(["1girl, solo, red hair, smile", "1girl, outdoors, blue sky, standing"]) == "tags"

    def test_prose(self):
        assert caption_style(["A photo of a woman standing in a field, smiling at the camera.",
                              "An old red car parked on a quiet street at night."]) == "prose"

    def test_none(self):
        assert caption_style([]) == "none"


class TestRecommend:
    def test_small_tagged_character_set(self):
        """15 tagged 768-px images on SD1.5: native 512, rank 8, 100 views per image, shuffled tags."""
        stats = DatasetStats(15, 15, (768,) * 15, "tags")
        recs = by_key(recommend(stats, "sd1"))
        assert recs["resolution"].value == 512
        assert recs["lora_rank"].value == 8
        assert recs["max_train_steps"].value == 1500
        assert recs["learning_rate"].value == 1e-4
        assert recs["shuffle_caption"].value is True and recs["keep_tokens"].value == 1
        assert all(r.reason for r in recs.values())

    def test_small_images_lower_the_resolution(self):
        """Mostly 640-px images for SDXL: train at 640, not 1024 (no upscaling)."""
        stats = DatasetStats(40, 40, (640,) * 35 + (1200,) * 5, "prose")
        recs = by_key(recommend(stats, "sdxl"))
        assert recs["resolution"].value == 640 and "smaller than the native 1024" in recs["resolution"].reason
        assert recs["shuffle_caption"].value is False
        assert recs["lora_rank"].value == 16

    def test_learning_rate_scales_with_rank_over_alpha_and_batch(self):
        stats = DatasetStats(200, 200, (1024,) * 200, "prose")
        recs = by_key(recommend(stats, "sdxl", effective_batch=4, lora_alpha=16))
        assert recs["lora_rank"].value == 32
        assert recs["learning_rate"].value == 4e-4  # 1e-4 × 32/16 × √4
        assert recs["max_train_steps"].value == 500  # 10 views × 200 images / 4

    def test_adaptive_optimizer_gets_unit_lr(self):
        recs = by_key(recommend(DatasetStats(10, 10, (512,) * 10, "none"), "sd1", optimizer="prodigy"))
        assert recs["learning_rate"].value == 1.0
        assert recs["trigger_word"].value == "(set one)"
