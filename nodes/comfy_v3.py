"""Render a `NodeDef` as a ComfyUI V3 node class (`comfy_api.latest.io`). Imported only inside ComfyUI."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .spec import NodeDef, Result

_BUILTIN_SOCKETS = {"MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae, "IMAGE": io.Image, "LATENT": io.Latent,
                    "CONDITIONING": io.Conditioning}
_CUSTOM: dict[str, type] = {}


def _socket_type(type_name: str):
    if type_name in _BUILTIN_SOCKETS:
        return _BUILTIN_SOCKETS[type_name]
    key = f"{type(type_name).__name__}:{type_name}"
    if key not in _CUSTOM:
        custom = io.Custom(type_name)
        if type(type_name) is not str:  # e.g. ComboName: keep its comparison (ComfyUI 0.3.x wraps it in its own)
            custom.io_type = type_name
        _CUSTOM[key] = custom
    return _CUSTOM[key]


def _input(i):
    common = dict(optional=i.optional, tooltip=i.tooltip, display_name=i.display_name)
    if i.type == "INT":
        return io.Int.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step,
                            control_after_generate=i.control_after_generate, **common)
    if i.type == "FLOAT":
        return io.Float.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, round=i.round, **common)
    if i.type == "STRING":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, **common)
    if i.type == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, **common)
    if i.type == "COMBO":
        return io.Combo.Input(i.name, options=i.choices(), default=i.default, **common)
    return _socket_type(i.type).Input(i.name, **common)


def _output(o):
    # Output ids must differ from input ids (ComfyUI 0.3.x checks both lists together); the name is displayed.
    common = dict(display_name=o.name, tooltip=o.tooltip)
    if o.type == "STRING":
        return io.String.Output(f"out_{o.name}", **common)
    if o.type == "FLOAT":
        return io.Float.Output(f"out_{o.name}", **common)
    return _socket_type(o.type).Output(f"out_{o.name}", **common)


def _ui(result: Result, cls) -> dict | None:
    out: dict = {}
    if result.text:
        out["text"] = list(result.text)
    if result.images is not None:
        out.update(ui.PreviewImage(result.images, cls=cls).as_dict())
    return out or None


def v3_class(node: NodeDef) -> type:
    """A V3 ComfyNode whose schema is `node` and whose execute calls `node.run`."""

    class RFTNode(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            description = node.description
            if node.unavailable:
                description = f"DISABLED: {node.unavailable}. {description}"
            return io.Schema(node_id=node.node_id, display_name=node.display_name, category=node.category,
                             description=description, inputs=[_input(i) for i in node.inputs],
                             outputs=[_output(o) for o in node.outputs], is_output_node=node.output_node)

        @classmethod
        def execute(cls, **kwargs):
            result = node.run(**kwargs)
            return io.NodeOutput(*result.values, ui=_ui(result, cls))

    if node.unavailable:
        def validate_inputs(cls, **kwargs):
            return f"{node.display_name} is disabled: {node.unavailable}"

        RFTNode.validate_inputs = classmethod(validate_inputs)
    RFTNode.__name__ = RFTNode.__qualname__ = node.node_id
    return RFTNode
