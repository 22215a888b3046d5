"""Stub of ComfyUI's `folder_paths`: named model folders with extension filters."""
from __future__ import annotations

import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
models_dir = os.environ.get("STAR_STUB_MODELS_DIR", os.path.join(os.getcwd(), "models"))
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def set_models_dir(path: str) -> None:
    """Point every standard folder at `path` (tests call this with a tiny models tree)."""
    global models_dir
    models_dir = path
    folder_names_and_paths.clear()
    for name in ("checkpoints", "vae", "text_encoders", "clip"):
        folder_names_and_paths[name] = ([os.path.join(path, name)], set(supported_pt_extensions))


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    paths, exts = folder_names_and_paths.setdefault(folder_name, ([], set()))
    if full_folder_path in paths:
        if is_default:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return list(folder_names_and_paths[folder_name][0])


def get_filename_list(folder_name: str) -> list[str]:
    paths, exts = folder_names_and_paths.get(folder_name, ([], set()))
    found = set()
    for root in paths:
        if not os.path.isdir(root):
            continue
        for dirpath, _, files in os.walk(root, followlinks=True):
            for f in files:
                if not exts or os.path.splitext(f)[1].lower() in exts:
                    found.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    for root in folder_names_and_paths.get(folder_name, ([], set()))[0]:
        candidate = os.path.join(root, filename)
        if os.path.isfile(candidate):
            return candidate
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return path


set_models_dir(models_dir)
