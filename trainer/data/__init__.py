"""The dataset half of training: finding images and captions, bucketing, loading pixels, caching latents.

Modules: `options` (DatasetOptions), `sources` (scan a folder: images, captions, problems), `metadata` (CSV/JSONL
caption files), `images` (header checks, decoding to RGB), `buckets` (kohya aspect-ratio buckets and crops),
`captions` (caption augmentation, tag statistics), `dataset` (TrainDataset: epochs, batches, samples),
`latent_cache` (LatentCache), `report` (check_dataset / format_report), `problems` (Problem, BadFileError),
`recommend` (settings proposed from a dataset's size, resolutions and caption style).
"""

from .buckets import Bucket, CropPlan, assign_bucket, format_bucket_table, make_buckets, plan_crop
from .captions import process_caption, tag_frequency
from .dataset import Sample, TrainDataset
from .images import load_rgb, read_header
from .latent_cache import CachedLatent, LatentCache
from .options import DatasetOptions
from .problems import BadFileError, Problem
from .report import DatasetReport, check_dataset, format_report
from .sources import DatasetScan, ImageRecord, scan_dataset

__all__ = [
    "BadFileError", "Bucket", "CachedLatent", "CropPlan", "DatasetOptions", "DatasetReport", "DatasetScan",
    "ImageRecord", "LatentCache", "Problem", "Sample", "TrainDataset", "assign_bucket", "check_dataset",
    "format_bucket_table", "format_report", "load_rgb", "make_buckets", "plan_crop", "process_caption",
    "read_header", "scan_dataset", "tag_frequency",
]
