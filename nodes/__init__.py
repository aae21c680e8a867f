"""ComfyUI face of comfy-rft (V3 schema). The node classes arrive with the node-pack issue."""

NODE_CLASSES: list = []
