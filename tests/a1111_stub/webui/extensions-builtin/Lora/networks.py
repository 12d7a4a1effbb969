"""Stand-in for extensions-builtin/Lora/networks.py (webui v1.10.1): the state LoRA Loop reads and resets.

Mirrored: `loaded_networks` (the networks the last generation applied), the per-layer bookkeeping that
`network_apply_weights` leaves on torch layers (`network_weights_backup`, `network_bias_backup` on the CPU,
`network_current_names`), `network_restore_weights_from_backup`, `load_networks(names)` (clears and reloads the list),
and `list_available_networks()` (rescans `--lora-dir`). `apply_for_test` (stub-only) leaves a layer exactly as
`network_apply_weights` does after merging a LoRA delta into the weight in place.
"""

from pathlib import Path
from types import SimpleNamespace

import torch
from modules import shared

available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
networks_in_memory = {}
loaded_networks = []
list_calls = 0  # stub-only
load_calls = []  # stub-only: the names of every load_networks call


def store_weights_backup(weight):
    if weight is None:
        return None
    return weight.to("cpu", copy=True)


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        restore_weights_backup(self, "weight", weights_backup)
    restore_weights_backup(self, "bias", bias_backup)


def apply_for_test(layer, delta, name="applied"):
    """What network_apply_weights leaves behind after merging `delta` for the network set `(name, 1, 1, None)`."""
    if getattr(layer, "network_weights_backup", None) is None:
        layer.network_weights_backup = store_weights_backup(layer.weight)
        layer.network_bias_backup = store_weights_backup(getattr(layer, "bias", None))
    with torch.no_grad():
        layer.weight += delta.to(layer.weight)
    layer.network_current_names = ((name, 1.0, 1.0, None),)
    if not any(n.name == name for n in loaded_networks):
        loaded_networks.append(SimpleNamespace(name=name, te_multiplier=1.0, unet_multiplier=1.0, dyn_dim=None,
                                               bundle_embeddings={}))


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    load_calls.append(list(names))
    loaded_networks.clear()
    missing = [n for n in names if n not in available_network_aliases]
    if missing:
        list_available_networks()
    for name in names:
        entry = available_network_aliases.get(name)
        if entry is not None:
            loaded_networks.append(SimpleNamespace(name=name, te_multiplier=1.0, unet_multiplier=1.0, dyn_dim=None,
                                                   bundle_embeddings={}, network_on_disk=entry))


def list_available_networks():
    global list_calls
    list_calls += 1
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    folder = Path(shared.cmd_opts.lora_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in (".pt", ".ckpt", ".safetensors"):
            entry = SimpleNamespace(name=path.stem, filename=str(path), alias=path.stem)
            available_networks[path.stem] = entry
            available_network_aliases[path.stem] = entry
