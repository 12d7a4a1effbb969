"""Never OOM: estimate a run's peak memory and step time, plan settings that fit, recover when memory runs out.

What runners and hosts call is imported here; the subpackages hold how it is done:

    estimation/  what a run costs: a training step traced on the meta device (tracer, simulate, architecture),
                 fitted per-architecture profiles (profiles, profiles.json), `estimate` (peak bytes and seconds of a
                 `RunShape`), `probe` (measured peaks), `devices` (GPU table, free memory)
    planning/    `planner.make_plan` (the fastest settings that fit, `Plan.apply(config)`) and `autoplan`
                 (`plan_for_config`, `calibrate`, `fit_advice`: from a config, bundle and dataset to a `Plan`)
    recovery/    at run time: `ladder.OomRecovery` (the OOM ladder), `levers` (what each rung does), `spill` (spill
                 detection)

The keys the planner may choose are a config fact (`config.PLANNABLE`); `loraloop plan` is `cli/plan.py`; settings
proposed from a dataset are `data/recommend.py`.
"""

from ..units import GIB
from .estimation.devices import (
    CUDA_CONTEXT_BYTES,
    GENERIC_GPU,
    DeviceSpec,
    current_device,
    find_device,
    free_bytes,
    with_memory,
)
from .estimation.estimate import MemoryEstimate, ModelInfo, RunShape, TimeEstimate
from .planning.autoplan import calibrate, fit_advice, model_info, plan_for_config
from .planning.planner import DEFAULT_MARGIN, Change, DatasetFacts, Plan, PlanRequest, make_plan
from .recovery.ladder import OomRecovery, OutOfMemoryGiveUp, is_out_of_memory
from .recovery.levers import release_memory
from .recovery.spill import SpillEvent, SpillGuard

__all__ = [
    "CUDA_CONTEXT_BYTES", "DEFAULT_MARGIN", "GENERIC_GPU", "GIB", "Change", "DatasetFacts", "DeviceSpec",
    "MemoryEstimate", "ModelInfo", "OomRecovery", "OutOfMemoryGiveUp", "Plan", "PlanRequest", "RunShape", "SpillEvent",
    "SpillGuard", "TimeEstimate", "calibrate", "current_device", "find_device", "fit_advice", "free_bytes",
    "is_out_of_memory", "make_plan", "model_info", "plan_for_config", "release_memory", "with_memory",
]
