"""NoFlash Attention for ComfyUI: registers the nodes and the web extension, and runs the start-up auto-patch.

Outside ComfyUI (pytest imports the tree, or a plain ``import``) this module only defines ``WEB_DIRECTORY``: the
nodes need ``comfy_api``, and the start-up patch belongs to a ComfyUI process.
"""

import sys

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY"]


def _inside_comfyui() -> bool:
    # ComfyUI imports its model management and folder paths before it loads custom nodes.
    return bool(__package__) and "comfy.model_management" in sys.modules and "folder_paths" in sys.modules


if _inside_comfyui():
    from .nodes import comfy_entrypoint
    from .nodes.startup import on_pack_load

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
    on_pack_load()
