"""ComfyUI entry point of the comfy-rft node pack.

ComfyUI imports this folder as a package. Nothing heavy is imported here: torch, diffusers and the
trainers load when a node runs. In a bare clone (no `pip install`), the folder itself is put on
the import path (at the end, so it never shadows ComfyUI's own `nodes` module) so that
`import comfy_rft` finds the engine next to this file.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("comfy_rft") is None:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

try:  # ComfyUI's model-folder registry: reward weights live in models/rewards (and extra_model_paths.yaml)
    import folder_paths

    folder_paths.folder_names_and_paths.setdefault(
        "rewards", ([os.path.join(folder_paths.models_dir, "rewards")], {".pt", ".pth", ".safetensors", ".json"}))
except ImportError:  # not running inside ComfyUI
    pass


async def comfy_entrypoint():
    """ComfyUI's V3 hook: an extension listing the pack's nodes."""
    from comfy_api.latest import ComfyExtension

    from comfy_rft.nodes import comfy_node_classes

    class RewardFineTuning(ComfyExtension):
        async def get_node_list(self):
            return comfy_node_classes()

    return RewardFineTuning()
