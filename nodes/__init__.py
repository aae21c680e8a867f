"""ComfyUI face of comfy-rft: node definitions (`node_defs`) and their ComfyUI V3 classes (`comfy_node_classes`).

Importing this package imports nothing heavy (no torch). `node_defs()` imports the trainers' Config
classes (torch, which ComfyUI has loaded already; no diffusers, transformers or peft). Heavy imports
happen inside the node functions, when a node runs.
"""

from __future__ import annotations

import logging

log = logging.getLogger("comfy_rft")


def node_defs():
    """Every node of the pack, in menu order (trainer nodes are generated from `trainers.METHODS`)."""
    from .lora_io import lora_nodes
    from .rewards import prompt_nodes, reward_nodes
    from .train import plot_node, trainer_nodes

    defs = [*reward_nodes(), *prompt_nodes(), *trainer_nodes(), plot_node(), *lora_nodes()]
    for d in defs:
        if d.unavailable:
            log.warning("comfy-rft: node %s is disabled: %s", d.node_id, d.unavailable)
    return defs


def comfy_node_classes():
    """The V3 node classes ComfyUI registers (needs `comfy_api`, i.e. a running ComfyUI)."""
    from .comfy_v3 import v3_class

    return [v3_class(d) for d in node_defs()]
