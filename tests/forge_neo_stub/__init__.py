"""A stand-in for what Forge Neo (Haoming02/sd-webui-forge-classic, branch neo) exposes as `shared.sd_model`.

Written from Neo's interface, not its code (see neo.py for what is kept). The real-module test is
tests/test_a1111_forge_neo_real.py (FORGE_NEO_DIR).
"""
