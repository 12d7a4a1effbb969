"""Never OOM: estimate a run's peak memory and step time, plan settings that fit, recover when memory runs out.

Modules, one concept each:
    tracer / simulate / architecture  a training step traced on the meta device (exact live bytes, FLOPs, traffic)
    profiles      fitted per-architecture models (shipped table for SD1/SD2/SDXL; live for other architectures)
    estimate      peak memory and seconds per step of a `RunShape`
    devices       GPU table, free memory
    planner       `make_plan`: the fastest settings that fit; `Plan.apply(config)`
    autoplan      `plan_for_config`, `probe`, `calibrate`: what a runner or host calls
    probe         measured peaks (CUDA allocator, CPU profiler events)
    recovery      `OomRecovery`: the run-time ladder; levers: its levers; spill: spill detection
    recommend     settings proposed from the dataset
    cli           `loraloop plan`
"""
