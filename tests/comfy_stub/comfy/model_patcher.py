"""Stand-in for comfy/model_patcher.py (ComfyUI 0.12.3): the ModelPatcher surface LoRA Loop uses."""

import copy
import uuid


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.patches = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.patches_uuid = uuid.uuid4()
        self.parent = None

    def is_dynamic(self):
        return False

    # Partial loading (lowvram): the stand-in only keeps the books; `partial_loads` records each call.
    loaded_bytes = None
    partial_loads: list

    def model_size(self):
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    def loaded_size(self):
        return self.model_size() if self.loaded_bytes is None else self.loaded_bytes

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        before = self.loaded_size()
        self.loaded_bytes = max(0, min(self.model_size(), before + int(extra_memory)))
        self.__dict__.setdefault("partial_loads", []).append((device_to, int(extra_memory)))
        return self.loaded_bytes - before

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.object_patches_backup = self.object_patches_backup
        n.model_options = copy.deepcopy(self.model_options)
        n.parent = self
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        taken = []
        for key, value in patches.items():
            self.patches.setdefault(key, []).append((strength_patch, value, strength_model))
            taken.append(key)
        self.patches_uuid = uuid.uuid4()
        return taken

    def model_dtype(self):
        return self.model.get_dtype()

    def model_patches_models(self):
        return []

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for name, obj in self.object_patches.items():
            if name not in self.object_patches_backup:
                self.object_patches_backup[name] = getattr(self.model, name)
            setattr(self.model, name, obj)
        return self.model


class ModelPatcherDynamic(ModelPatcher):
    def is_dynamic(self):
        return True
