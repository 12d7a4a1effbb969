"""DatasetOptions validation: every bad value names the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraloop.trainer.data.options import DatasetOptions
from loraloop.trainer.errors import ConfigError


def test_defaults_and_coercion(tmp_path: Path) -> None:
    o = DatasetOptions(train_data_dir=str(tmp_path), metadata_path="",  # type: ignore[arg-type]
                       caption_extensions=[".txt"], background=[0, 0, 0])  # type: ignore[arg-type]
    assert o.train_data_dir == tmp_path and o.metadata_path is None
    assert o.caption_extensions == (".txt",) and o.background == (0, 0, 0)
    assert o.max_area == 512 * 512
    assert DatasetOptions(train_data_dir=tmp_path).caption_extensions == (".txt", ".caption")


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("missing_caption", "ignore", "warn_empty"),
    ("crop", "top", "center"),
    ("resolution", 500, "multiple of 8"),
    ("resolution", 32, "64 to 8192"),
    ("min_bucket_reso", 1024, "set min_bucket_reso to 512 or less, or leave it unset (then 256)"),
    ("max_bucket_reso", 256, "set max_bucket_reso to 512 or more, or leave it unset (then 1024)"),
    ("min_bucket_reso", 300, "not a multiple of `bucket_reso_steps` 64"),
    ("min_bucket_reso", "big", "an integer"),
    ("bucket_reso_steps", 60, "multiple of 8"),
    ("caption_dropout_rate", 1.5, "0.0 to 1.0"),
    ("caption_tag_dropout_rate", -0.1, "0.0 to 1.0"),
    ("keep_tokens", -1, "0 to"),
    ("background", (255, 255), "three integers"),
    ("background", (0, 0, 300), "three integers"),
    ("max_image_pixels", 0, "4096 to"),
    ("flip_aug", "yes", "true or false"),
    ("caption_extensions", ("txt",), "starting with a dot"),
    ("prefer_downscale_side", -5, "0 to"),
])
def test_bad_values_name_key_value_and_range(tmp_path: Path, key: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        DatasetOptions(train_data_dir=tmp_path, **{key: value})  # type: ignore[arg-type]
    assert err.value.key == key
    assert key in str(err.value) and repr(value) in str(err.value) and allowed in str(err.value)


def test_trigger_policy_needs_trigger_word(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        DatasetOptions(train_data_dir=tmp_path, missing_caption="trigger")
    assert err.value.key == "trigger_word"
    DatasetOptions(train_data_dir=tmp_path, missing_caption="trigger", trigger_word="sks")


class TestBucketLimits:
    def test_unchecked_without_buckets(self, tmp_path: Path) -> None:
        """enable_bucket false: min/max_bucket_reso are unused, so a 128-px run with the 256 default is accepted."""
        options = DatasetOptions(train_data_dir=tmp_path, resolution=128, min_bucket_reso=256, max_bucket_reso=64,
                                 enable_bucket=False)
        assert options.min_bucket_reso == 256

    def test_checked_with_buckets(self, tmp_path: Path) -> None:
        """The same limits with buckets on: the message names the value to change, to what, and the derived one."""
        with pytest.raises(ConfigError) as err:
            DatasetOptions(train_data_dir=tmp_path, resolution=128, min_bucket_reso=256, enable_bucket=True)
        assert err.value.key == "min_bucket_reso"
        assert str(err.value) == ("`min_bucket_reso` 256 is above `resolution` 128: set min_bucket_reso to 128 or "
                                  "less, or leave it unset (then 64)")

    @pytest.mark.parametrize(("resolution", "expected"), [(64, (32, 128, 8)), (512, (256, 1024, 64)),
                                                          (1024, (256, 2048, 64))])
    def test_unset_limits_follow_the_resolution(self, tmp_path: Path, resolution: int,
                                                expected: tuple[int, int, int]) -> None:
        """Left unset, the limits are derived from the resolution by the config's rule: 64 px no longer meets 256."""
        o = DatasetOptions(train_data_dir=tmp_path, resolution=resolution)
        assert (o.min_bucket_reso, o.max_bucket_reso, o.bucket_reso_steps) == expected

    def test_explicit_limits_are_kept(self, tmp_path: Path) -> None:
        o = DatasetOptions(train_data_dir=tmp_path, resolution=64, min_bucket_reso=32, bucket_reso_steps=32)
        assert (o.min_bucket_reso, o.max_bucket_reso, o.bucket_reso_steps) == (32, 128, 32)
