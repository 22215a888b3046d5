"""Loads the pack the way ComfyUI does (a package from the repo root) on top of the host stub."""
from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

STUB = Path(__file__).resolve().parent
REPO = STUB.parents[1]
PACKAGE = "star_pack_under_test"


def load_pack(models_dir: Path, reset: bool = True):
    """Imports the repo's `__init__.py` as a package with the stub host whose models folder is `models_dir`
    (`reset=False` keeps folders registered before, as extra_model_paths.yaml would)."""
    if str(STUB) not in sys.path:
        sys.path.insert(0, str(STUB))
    import folder_paths

    if reset:
        folder_paths.set_models_dir(str(models_dir))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def node_classes(pack) -> dict:
    """node_id → class, through the V3 entry point exactly as ComfyUI calls it."""
    async def collect():
        extension = await pack.comfy_entrypoint()
        return await extension.get_node_list()
    return {cls.define_schema().node_id: cls for cls in asyncio.run(collect())}


def run(cls, **inputs):
    """Executes a node and returns its outputs tuple."""
    return cls.execute(**inputs).result
