"""LoRA Loop: train LoRAs inside the image apps people already run.

`loraloop.trainer` is the host-agnostic engine; `loraloop.comfy` and `loraloop.a1111` adapt it to the hosts,
`loraloop.cli` is the standalone front end.
"""

__version__ = "0.1.0"
