"""Stand-in for ComfyUI 0.12.3's folder_paths.py. `set_base(path)` (stub only) lays out input/output/models there."""

import os

folder_names_and_paths = {}
filename_list_cache = {}
supported_pt_extensions = {".ckpt", ".pt", ".bin", ".pth", ".safetensors"}
base_path = output_directory = input_directory = models_dir = None


def set_base(path):
    global base_path, output_directory, input_directory, models_dir
    base_path = str(path)
    models_dir = os.path.join(base_path, "models")
    input_directory = os.path.join(base_path, "input")
    output_directory = os.path.join(base_path, "output")
    folder_names_and_paths.clear()
    filename_list_cache.clear()
    folder_names_and_paths["loras"] = ([os.path.join(base_path, "models", "loras")], supported_pt_extensions)
    for folder in (input_directory, output_directory, folder_names_and_paths["loras"][0][0]):
        os.makedirs(folder, exist_ok=True)


def get_input_directory():
    return input_directory


def get_output_directory():
    return output_directory


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    paths, _exts = folder_names_and_paths.setdefault(folder_name, ([], set()))
    paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)


def get_filename_list(folder_name):
    out = []
    paths, exts = folder_names_and_paths[folder_name]
    for root_dir in paths:
        for root, _, files in os.walk(root_dir, followlinks=True):
            for name in files:
                if not exts or os.path.splitext(name)[1].lower() in exts:
                    out.append(os.path.relpath(os.path.join(root, name), root_dir).replace(os.sep, "/"))
    return sorted(out)


def get_full_path(folder_name, filename):
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for root_dir in folder_names_and_paths[folder_name][0]:
        full = os.path.join(root_dir, filename)
        if os.path.isfile(full):
            return full
    return None
