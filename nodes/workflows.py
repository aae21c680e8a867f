"""The shipped UI-format workflows (workflows/*.json), generated from the node definitions.

    python -m comfy_rft.nodes.workflows [FOLDER]     # rewrites workflows/ (default: the checkout's)
                                                     # and records new trainer widgets (widget_order.json)

One workflow per training method (every key of `trainers.METHODS`): Load Checkpoint -> RFT Train ->
RFT Save LoRA -> stock Load LoRA + KSampler -> Save Image, beside the same KSampler without the LoRA;
plus a scoring workflow. Widget values are written in the order the frontend expects, from the same
`object_info` the tests check, so a changed Config default or a new option cannot leave a workflow stale
(the tests compare these files with a fresh build). ComfyUI's template browser lists `workflows/` of a
pack as it lists `example_workflows/`, so there is exactly one copy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .spec import object_info, widget_names
from .stock_nodes import STOCK_NODES

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
PROMPTS = "a photo of a cat sitting on a windowsill\na watercolor painting of a lighthouse at dusk\n" \
          "a bowl of ramen on a wooden table"
NEGATIVE = "blurry, low quality"


def node_infos() -> dict[str, dict]:
    from . import node_defs

    return {**STOCK_NODES, **{d.node_id: object_info(d) for d in node_defs()}}


def _default(info: dict, name: str):
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            typ, opts = info["input"][section][name]
            if "default" in opts:
                return opts["default"]
            if typ == "COMBO" and opts.get("options"):
                return opts["options"][0]
            return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ)
    raise KeyError(name)


def _inputs(info: dict):
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            yield name, info["input"][section][name][0]


class Workflow:
    """A UI-format (version 0.4) workflow under construction."""

    def __init__(self, infos: dict[str, dict]):
        self.infos = infos
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_name: str, pos: tuple[int, int], title: str | None = None, **widgets) -> int:
        info = self.infos[type_name]
        names = widget_names(info)
        unknown = set(widgets) - set(names)
        if unknown:
            raise KeyError(f"{type_name} has no widget(s) {sorted(unknown)}")
        values = []
        for name in names:
            if name.endswith(":control_after_generate"):
                values.append(widgets.get(name, "fixed"))
            else:
                values.append(widgets[name] if name in widgets else _default(info, name))
        node_id = len(self.nodes) + 1
        node = {
            "id": node_id, "type": type_name, "pos": list(pos), "size": [320, 60 + 26 * (len(names) + 2)],
            "flags": {}, "order": 0, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in _inputs(info) if t not in
                       ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(zip(info["output_name"], info["output"]))],
            "properties": {"Node name for S&R": type_name},
            "widgets_values": values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def link(self, src: int, output: str, dst: int, input_name: str) -> None:
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, o in enumerate(source["outputs"]) if o["name"] == output)
        out_type = source["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        entry = next((i for i in target["inputs"] if i["name"] == input_name), None)
        if entry is None:  # a widget fed by a link: it gets an input slot that names its widget
            typ = dict(_inputs(self.infos[target["type"]]))[input_name]
            entry = {"name": input_name, "type": typ, "widget": {"name": input_name}, "link": None}
            target["inputs"].append(entry)
        if entry["link"] is not None:
            raise ValueError(f"{target['type']}.{input_name} is already linked")
        entry["link"] = link_id
        source["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, src, slot, dst, target["inputs"].index(entry), out_type])

    def to_json(self) -> dict:
        # "order": a topological order of the graph, as the editor saves it.
        deps = {n["id"]: {link[1] for link in self.links if link[3] == n["id"]} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = [i for i in sorted(deps) if i not in done and deps[i] <= set(done)]
            if not ready:
                raise ValueError("the workflow has a cycle")
            done += ready
        for n in self.nodes:
            n["order"] = done.index(n["id"])
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
                "version": 0.4}


def trainer_workflow(method: str, infos: dict[str, dict]) -> dict:
    w = Workflow(infos)
    ckpt = w.add("CheckpointLoaderSimple", (0, 0), ckpt_name=CHECKPOINT)
    reward = w.add("RFTLoadReward_aesthetic", (0, 200))
    prompts = w.add("RFTPromptList", (0, 420), text=PROMPTS)
    train = w.add(f"RFTTrain_{method}", (380, 0))
    save = w.add("RFTSaveLoRA", (760, 0), filename_prefix=f"rft/{method}")
    plot = w.add("RFTPlotTraining", (760, 200))
    lora = w.add("LoraLoader", (1140, 0))
    positive = w.add("CLIPTextEncode", (1140, 260), title="Prompt (the first training prompt)")
    negative = w.add("CLIPTextEncode", (1140, 460), title="Negative prompt", text=NEGATIVE)
    latent = w.add("EmptyLatentImage", (1140, 660))
    base = w.add("KSampler", (1520, 0), title="KSampler (base model)", seed=42, steps=30, cfg=7.5,
                 sampler_name="euler", scheduler="normal")
    tuned = w.add("KSampler", (1520, 360), title="KSampler (with the trained LoRA)", seed=42, steps=30, cfg=7.5,
                  sampler_name="euler", scheduler="normal")
    decode_base = w.add("VAEDecode", (1900, 0))
    decode_tuned = w.add("VAEDecode", (1900, 360))
    save_base = w.add("SaveImage", (2140, 0), title="Save image (base)", filename_prefix="rft/base")
    save_tuned = w.add("SaveImage", (2140, 360), title="Save image (LoRA)", filename_prefix=f"rft/{method}_lora")
    for name, out in (("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")):
        w.link(ckpt, out, train, name)
    w.link(reward, "reward", train, "reward")
    w.link(prompts, "prompts", train, "prompts")
    w.link(train, "lora", save, "lora")
    w.link(train, "log", plot, "log")
    w.link(ckpt, "MODEL", lora, "model")
    w.link(ckpt, "CLIP", lora, "clip")
    w.link(save, "lora_name", lora, "lora_name")
    w.link(ckpt, "CLIP", positive, "clip")
    w.link(ckpt, "CLIP", negative, "clip")
    w.link(prompts, "first_prompt", positive, "text")
    for sampler, model_src, model_out in ((base, ckpt, "MODEL"), (tuned, lora, "MODEL")):
        w.link(model_src, model_out, sampler, "model")
        w.link(positive, "CONDITIONING", sampler, "positive")
        w.link(negative, "CONDITIONING", sampler, "negative")
        w.link(latent, "LATENT", sampler, "latent_image")
    w.link(base, "LATENT", decode_base, "samples")
    w.link(tuned, "LATENT", decode_tuned, "samples")
    w.link(ckpt, "VAE", decode_base, "vae")
    w.link(ckpt, "VAE", decode_tuned, "vae")
    w.link(decode_base, "IMAGE", save_base, "images")
    w.link(decode_tuned, "IMAGE", save_tuned, "images")
    return w.to_json()


def scoring_workflow(infos: dict[str, dict]) -> dict:
    w = Workflow(infos)
    ckpt = w.add("CheckpointLoaderSimple", (0, 0), ckpt_name=CHECKPOINT)
    reward = w.add("RFTLoadReward_aesthetic", (0, 200))
    prompts = w.add("RFTPromptList", (0, 420), text=PROMPTS)
    positive = w.add("CLIPTextEncode", (380, 0), title="Prompt (the first prompt of the list)")
    negative = w.add("CLIPTextEncode", (380, 200), title="Negative prompt", text=NEGATIVE)
    latent = w.add("EmptyLatentImage", (380, 400), batch_size=2)
    sampler = w.add("KSampler", (760, 0), seed=42, steps=30, cfg=7.5, sampler_name="euler", scheduler="normal")
    decode = w.add("VAEDecode", (1140, 0))
    score = w.add("RFTScoreImages", (1380, 0))
    preview = w.add("PreviewImage", (1380, 260))
    w.link(ckpt, "CLIP", positive, "clip")
    w.link(ckpt, "CLIP", negative, "clip")
    w.link(prompts, "first_prompt", positive, "text")
    w.link(ckpt, "MODEL", sampler, "model")
    w.link(positive, "CONDITIONING", sampler, "positive")
    w.link(negative, "CONDITIONING", sampler, "negative")
    w.link(latent, "LATENT", sampler, "latent_image")
    w.link(sampler, "LATENT", decode, "samples")
    w.link(ckpt, "VAE", decode, "vae")
    w.link(decode, "IMAGE", score, "images")
    w.link(reward, "reward", score, "reward")
    w.link(prompts, "prompts", score, "prompts")
    w.link(decode, "IMAGE", preview, "images")
    return w.to_json()


def build_all() -> dict[str, dict]:
    """{file name: UI workflow} for every shipped workflow."""
    from comfy_rft.trainers import METHODS

    infos = node_infos()
    workflows = {f"rft_train_{m}.json": trainer_workflow(m, infos) for m in METHODS}
    workflows["rft_score_images.json"] = scoring_workflow(infos)
    return workflows


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def record_widget_order() -> dict[str, list[str]]:
    """Append the trainer nodes' new widgets to nodes/widget_order.json (recorded names never move)."""
    from . import node_defs
    from .train import WIDGET_ORDER_FILE, widget_order

    order = widget_order()
    for d in node_defs():
        if d.node_id.startswith("RFTTrain_"):
            recorded = order.setdefault(d.node_id, [])
            recorded += [i.name for i in d.inputs if i.is_widget and i.name not in recorded]
    body = ",\n".join(f"    {node!r}: [\n" + "".join(f"        {n!r},\n" for n in names) + "    ]"
                       for node, names in order.items())
    WIDGET_ORDER_FILE.write_text(
        '"""Recorded widget order of the trainer nodes (generated by python -m comfy_rft.nodes.workflows).\n\n'
        "Saved workflows store widget values by position: recorded names keep their place, new widgets are\n"
        'appended. Never reorder or delete entries by hand.\n"""\n\n'
        f"WIDGET_ORDER = {{\n{body},\n}}\n", encoding="utf-8")
    import importlib

    from . import widget_order as module

    importlib.reload(module)
    return order


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "workflows"
    folder.mkdir(parents=True, exist_ok=True)
    record_widget_order()
    for name, workflow in build_all().items():
        (folder / name).write_text(dumps(workflow), encoding="utf-8")
        print(f"wrote {folder / name}")


if __name__ == "__main__":
    main()
