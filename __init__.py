"""ComfyUI entry point of the STAR video super-resolution pack (V3 API): registration only.

Registers ``models/STAR`` with ComfyUI's model folders and exposes the nodes of ``nodes/`` through
``comfy_entrypoint``. The pack directory is appended to ``sys.path`` so the bundled ``star_core`` package imports
by its own name (it is also an installable library). Imported outside ComfyUI (e.g. when pytest collects the
repository as a package) it registers nothing.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    import folder_paths
    from comfy_api.latest import ComfyExtension, io

    _PACK_DIR = os.path.dirname(os.path.abspath(__file__))
    if _PACK_DIR not in sys.path:
        sys.path.append(_PACK_DIR)

    # Appending keeps any STAR folders that extra_model_paths.yaml registered before the packs were loaded.
    folder_paths.add_model_folder_path("STAR", os.path.join(folder_paths.models_dir, "STAR"))
    folder_paths.folder_names_and_paths["STAR"][1].update(folder_paths.supported_pt_extensions)

    from .nodes import NODES

    class STARExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    async def comfy_entrypoint() -> STARExtension:
        return STARExtension()
