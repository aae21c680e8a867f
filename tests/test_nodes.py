"""The ComfyUI node pack without ComfyUI: every node's schema, the shipped workflows, the nodes that need no model.

Nodes are declared as `NodeDef`s (nodes/spec.py) that ComfyUI's V3 classes are rendered from; here
they are rendered as the `/object_info` dictionary ComfyUI would serve and checked. The real rendering
through `comfy_api` and the real server are covered by tests/test_comfyui_integration.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from comfy_rft.config import config_fields
from comfy_rft.nodes import node_defs
from comfy_rft.nodes.spec import PROMPTS, REWARD, WIDGET_TYPES, ComboName, float_step, object_info, widget_names
from comfy_rft.nodes.stock_nodes import FILE_COMBOS, STOCK_NODES
from comfy_rft.trainers import METHODS

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"

# Node ids are part of every saved workflow: they may be added to, never renamed or removed.
STABLE_IDS = {
    "RFTLoadReward_brightness", "RFTLoadReward_jpeg", "RFTLoadReward_jpeg_incompressibility",
    "RFTLoadReward_aesthetic", "RFTLoadReward_hpsv2", "RFTLoadReward_hpsv2_1", "RFTLoadReward_pickscore",
    "RFTLoadReward_clipscore", "RFTLoadReward_imagereward", "RFTLoadReward_ocr", "RFTLoadRewardSpec",
    "RFTCombineRewards", "RFTRobustReward", "RFTScoreImages", "RFTPromptList", "RFTTrain_draft", "RFTTrain_rsaft",
    "RFTPlotTraining", "RFTSaveLoRA", "RFTLoadLoRA", "RFTPushLoRAToHub",
}


@pytest.fixture(scope="module")
def defs():
    return node_defs()


@pytest.fixture(scope="module")
def infos(defs):
    return {d.node_id: object_info(d) for d in defs}


# ---------------------------------------------------------------------------------------------- schemas


def test_every_schema_builds_with_unique_prefixed_ids(defs, infos):
    ids = [d.node_id for d in defs]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert STABLE_IDS <= set(ids), STABLE_IDS - set(ids)
    for d in defs:
        assert d.node_id.startswith("RFT"), d.node_id
        assert d.display_name.startswith("RFT "), d.display_name
        assert d.category.startswith("reward fine-tuning/"), d.category
        assert d.description.strip(), d.node_id
        names = [i.name for i in d.inputs]
        assert len(names) == len(set(names)), (d.node_id, names)
        assert callable(d.run)
        json.dumps(infos[d.node_id], default=str)  # what /object_info would serve


def test_every_input_and_output_has_a_tooltip(defs):
    for d in defs:
        for i in d.inputs:
            assert i.tooltip and len(i.tooltip.strip()) >= 8, (d.node_id, i.name)
        for o in d.outputs:
            assert o.tooltip and len(o.tooltip.strip()) >= 8, (d.node_id, o.name)


def test_widget_defaults_are_valid(defs):
    for d in defs:
        for i in d.inputs:
            if i.type in ("INT", "FLOAT"):
                assert i.min is not None and i.max is not None, (d.node_id, i.name)  # the frontend's default max is 2048
                assert i.min <= i.default <= i.max, (d.node_id, i.name, i.default)
                if i.type == "INT":
                    assert isinstance(i.default, int) and not isinstance(i.default, bool), (d.node_id, i.name)
            elif i.type == "COMBO" and not (callable(i.options) and i.default is None):  # file lists: any file
                assert i.default in i.choices(), (d.node_id, i.name, i.default, i.choices())
            elif i.type == "BOOLEAN":
                assert isinstance(i.default, bool), (d.node_id, i.name)
            elif i.type == "STRING":
                assert isinstance(i.default, str), (d.node_id, i.name)
            else:
                assert i.type.isupper(), (d.node_id, i.name, i.type)  # a socket type


def test_float_widgets_show_their_default(defs):
    """The frontend rounds a FLOAT widget to the decimals of its step: every default must survive that."""
    for d in defs:
        for i in d.inputs:
            if i.type == "FLOAT":
                precision = max(0, -math.floor(math.log10(i.step)))
                assert round(i.default, precision) == pytest.approx(i.default, rel=1e-12, abs=1e-15), (d.node_id, i.name)
    assert float_step(4e-4) == pytest.approx(1e-5)
    assert float_step(0.999) == pytest.approx(1e-3)
    assert float_step(0.0) == 0.01


def test_one_trainer_node_per_method_with_widgets_from_its_config(defs):
    """The Config dataclass is the single source of the trainer's widgets: names, defaults, bounds, help."""
    from comfy_rft.nodes.train import NOT_WIDGETS

    by_id = {d.node_id: d for d in defs}
    for key, (config_cls, _) in METHODS.items():
        node = by_id[f"RFTTrain_{key}"]
        widgets = {i.name: i for i in node.inputs if i.is_widget}
        fields = [(f, typ) for f, typ in config_fields(config_cls) if f.name not in NOT_WIDGETS]
        assert {f.name for f, _ in fields} | {"preview_every"} == set(widgets)
        for f, typ in fields:
            w = widgets[f.name]
            assert w.default == f.default, f.name
            assert w.tooltip.startswith(f.metadata["help"]), f.name
            if f.metadata.get("min") is not None:
                assert w.min == f.metadata["min"], f.name
            if f.metadata.get("max") is not None:
                assert w.max == f.metadata["max"], f.name
            if f.metadata.get("choices"):
                assert w.type == "COMBO" and tuple(w.choices()) == tuple(f.metadata["choices"]), f.name
            else:
                assert w.type == {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING"}[typ], f.name
        sockets = {i.name: i.type for i in node.inputs if not i.is_widget}
        assert sockets["model"] == "MODEL" and sockets["clip"] == "CLIP" and sockets["vae"] == "VAE"
        assert sockets["reward"] == REWARD and sockets["prompts"] == PROMPTS
        assert [o.type for o in node.outputs] == ["MODEL", "RFT_LORA", "RFT_TRAINING_LOG"]
        # every setting reaches the config: the node's keyword arguments build it
        values = {name: w.default for name, w in widgets.items() if name != "preview_every"}
        config = config_cls(**values)
        assert all(getattr(config, k) == v for k, v in values.items())


def test_saved_workflows_keep_their_widget_positions(defs):
    """Widget values are stored by position: recorded trainer widgets never move or vanish, new ones are appended."""
    from comfy_rft.nodes.train import widget_order

    order = widget_order()
    for d in defs:
        if not d.node_id.startswith("RFTTrain_"):
            continue
        names = [i.name for i in d.inputs if i.is_widget]
        recorded = order.get(d.node_id)
        assert recorded, f"{d.node_id}: run python -m comfy_rft.nodes.workflows to record its widgets"
        gone = [n for n in recorded if n not in names]
        assert not gone, f"{d.node_id}: widgets {gone} disappeared, which shifts every saved workflow's values"
        assert names[:len(recorded)] == recorded, d.node_id  # new widgets (not yet recorded) only after these


def test_new_config_options_are_appended_not_inserted(monkeypatch):
    from comfy_rft.nodes import train as train_nodes
    from comfy_rft.trainers.draft import DraftConfig, DraftMethod

    recorded = train_nodes.widget_order()["RFTTrain_draft"]
    monkeypatch.setattr(train_nodes, "widget_order", lambda: {"RFTTrain_draft": recorded[:3] + recorded[4:]})
    node = train_nodes.trainer_node("draft", DraftConfig, DraftMethod)
    names = [i.name for i in node.inputs if i.is_widget]
    assert names == recorded[:3] + recorded[4:] + [recorded[3]]  # the "new" widget goes last
    assert [i.name for i in node.inputs if not i.is_widget][:5] == ["model", "clip", "vae", "reward", "prompts"]


def test_a_new_method_gets_a_node_automatically(monkeypatch):
    from comfy_rft.config import option
    from comfy_rft.nodes import train as train_nodes
    from comfy_rft.trainers.draft import DraftConfig, DraftMethod

    @dataclasses.dataclass
    class NewConfig(DraftConfig):
        """A made-up method."""

        temperature: float = option(0.5, "A made-up knob.", min=0.0, max=1.0)

    monkeypatch.setitem(METHODS, "newmethod", (NewConfig, DraftMethod))
    node = {d.node_id: d for d in train_nodes.trainer_nodes()}["RFTTrain_newmethod"]
    knob = next(i for i in node.inputs if i.name == "temperature")
    assert knob.type == "FLOAT" and knob.default == 0.5 and knob.max == 1.0 and knob.tooltip == "A made-up knob."


def test_every_builtin_reward_has_a_loader_whose_options_are_factory_keywords(defs):
    from comfy_rft.nodes.rewards import SETTINGS, WEIGHT_FILES, node_suffix
    from comfy_rft.rewards import BUILTINS

    ids = {d.node_id for d in defs}
    for name, info in BUILTINS.items():
        assert f"RFTLoadReward_{node_suffix(name)}" in ids
        module, _, attr = info.factory.partition(":")
        factory = getattr(importlib.import_module(f"comfy_rft.rewards.{module}"), attr)
        keywords = set(inspect.signature(factory).parameters)
        options = [w.option for w in WEIGHT_FILES.get(name, ())] + [i.name for i in SETTINGS.get(name, ())]
        assert set(options) <= keywords, (name, set(options) - keywords)


def test_combo_name_links_to_combo_inputs_only():
    """RFT Save LoRA's file name must pass ComfyUI's link check into LoraLoader's list-typed lora_name."""
    name = ComboName("COMBO")
    assert not (name != ["a.safetensors", "b.safetensors"])  # V1 combo input: its list of choices
    assert not (name != "COMBO")  # V3 combo input
    assert name != "MODEL" and name != "STRING"
    assert json.dumps([name]) == '["COMBO"]'


def test_importing_the_pack_is_light():
    """ComfyUI start-up: the root package imports nothing; building every node definition loads the Config
    classes (torch, which ComfyUI has loaded already) but no diffusers, transformers, peft, matplotlib."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('comfy_rft_pack', {str(ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(ROOT)!r}])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['comfy_rft_pack'] = pack\n"
        "spec.loader.exec_module(pack)\n"
        "assert 'torch' not in sys.modules, 'torch imported by the pack root'\n"
        "assert callable(pack.comfy_entrypoint)\n"
        "import comfy_rft.nodes\n"
        "assert 'torch' not in sys.modules, 'torch imported by comfy_rft.nodes'\n"
        "comfy_rft.nodes.node_defs()\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'peft', 'matplotlib', 'safetensors', 'huggingface_hub',"
        " 'comfy_api') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_root_registers_the_rewards_folder_with_comfyui(tmp_path):
    code = (
        "import importlib.util, sys, types\n"
        "fp = types.ModuleType('folder_paths'); fp.models_dir = sys.argv[1]; fp.folder_names_and_paths = {}\n"
        "sys.modules['folder_paths'] = fp\n"
        f"spec = importlib.util.spec_from_file_location('comfy_rft_pack', {str(ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(ROOT)!r}])\n"
        "pack = importlib.util.module_from_spec(spec); spec.loader.exec_module(pack)\n"
        "paths, exts = fp.folder_names_and_paths['rewards']\n"
        "print(paths[0]); assert '.pth' in exts\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path / "rewards")


# ---------------------------------------------------------------------------------------------- workflows


def _all_infos(infos):
    return {**STOCK_NODES, **infos}


def _input_type(info, name):
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            return info["input"][section][name]
    raise KeyError(name)


def _check_widget(node_type, name, value, typ, opts):
    where = f"{node_type}.{name}={value!r}"
    if typ == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif typ == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif typ == "BOOLEAN":
        assert isinstance(value, bool), where
    elif typ == "STRING":
        assert isinstance(value, str), where
    elif typ == "COMBO":
        if (node_type, name) not in FILE_COMBOS and not callable(opts.get("options")):
            assert value in opts["options"], where
    if typ in ("INT", "FLOAT"):
        assert opts.get("min", -math.inf) <= value <= opts.get("max", math.inf), where


def test_every_method_has_a_workflow_and_a_scoring_one_exists():
    names = {p.name for p in WORKFLOWS.glob("*.json")}
    assert {f"rft_train_{m}.json" for m in METHODS} | {"rft_score_images.json"} <= names


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.name)
def test_workflow_uses_existing_nodes_with_valid_widgets_and_links(path, infos):
    all_infos = _all_infos(infos)
    wf = json.loads(path.read_text())
    assert "nodes" in wf and "links" in wf, "UI format (what the editor saves) expected"
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"])
    for n in wf["nodes"]:
        assert n["type"] in all_infos, f"{path.name}: unknown node type {n['type']}"
        info = all_infos[n["type"]]
        names = widget_names(info)
        values = n.get("widgets_values", [])
        # a widget added to a node since the file was written is missing at the end: the frontend uses its default
        assert len(values) <= len(names) and (len(values) == len(names) or n["type"].startswith("RFTTrain_")), \
            (path.name, n["type"], names, values)
        for name, value in zip(names, values):
            if name.endswith(":control_after_generate"):
                assert value in ("fixed", "increment", "decrement", "randomize"), (n["type"], value)
                continue
            typ, opts = _input_type(info, name)
            _check_widget(n["type"], name, value, typ, opts)
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for section, required in (("required", True), ("optional", False)):
            for name, (typ, _) in info["input"].get(section, {}).items():
                if required and typ not in WIDGET_TYPES:
                    assert name in linked, f"{path.name}: {n['type']}.{name} is not connected"
    link_ids = set()
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        link_ids.add(link_id)
        source, target = nodes[src], nodes[dst]
        out_type = all_infos[source["type"]]["output"][src_slot]
        entry = target["inputs"][dst_slot]
        assert entry["link"] == link_id
        in_type = _input_type(all_infos[target["type"]], entry["name"])[0]
        assert typ == out_type, (path.name, link_id)
        assert not (ComboName(out_type) != in_type) if out_type == "COMBO" else out_type == in_type, \
            f"{path.name}: {source['type']} {out_type} -> {target['type']}.{entry['name']} {in_type}"
        assert link_id in source["outputs"][src_slot]["links"]
    assert wf["last_link_id"] == max(link_ids, default=0)
    assert wf["last_node_id"] == max(nodes)


def test_workflows_are_up_to_date_with_the_node_definitions():
    """The JSON files are generated (python -m comfy_rft.nodes.workflows); a changed default must regenerate them."""
    from comfy_rft.nodes.workflows import build_all, dumps

    built = build_all()
    for name, workflow in built.items():
        saved = json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))
        for new, old in zip(workflow["nodes"], saved["nodes"]):  # options added since: appended, harmless
            if new["type"] == old["type"] and new["type"].startswith("RFTTrain_"):
                new["widgets_values"] = new["widgets_values"][:len(old["widgets_values"])]
        assert dumps(saved) == dumps(workflow), f"{name} is stale: run python -m comfy_rft.nodes.workflows"


def test_trainer_workflow_chains_save_lora_into_the_stock_loader():
    wf = json.loads((WORKFLOWS / "rft_train_draft.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    chain = {(nodes[s]["type"], nodes[d]["type"], nodes[d]["inputs"][slot]["name"]) for _, s, _, d, slot, _ in wf["links"]}
    assert ("CheckpointLoaderSimple", "RFTTrain_draft", "model") in chain
    assert ("RFTTrain_draft", "RFTSaveLoRA", "lora") in chain
    assert ("RFTSaveLoRA", "LoraLoader", "lora_name") in chain
    assert ("LoraLoader", "KSampler", "model") in chain and ("CheckpointLoaderSimple", "KSampler", "model") in chain
    assert sum(n["type"] == "SaveImage" for n in wf["nodes"]) == 2


# ---------------------------------------------------------------------------------------------- nodes that run here


def _run(defs, node_id, **kwargs):
    with torch.inference_mode():  # as ComfyUI runs every node
        return {d.node_id: d for d in defs}[node_id].run(**kwargs)


def test_prompt_list_from_text_and_file(defs, tmp_path, monkeypatch):
    result = _run(defs, "RFTPromptList", text="# comment\n a cat \n\na dog\n")
    assert result.values == (["a cat", "a dog"], "a cat")
    fp = types.ModuleType("folder_paths")
    fp.get_input_directory = lambda: str(tmp_path)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "prompts.txt").write_text("one\ntwo\nthree\n")
    node = {d.node_id: d for d in node_defs()}["RFTPromptList"]
    assert "sub/prompts.txt" in node.inputs[1].choices()
    assert node.run(text="ignored", file="sub/prompts.txt").values[0] == ["one", "two", "three"]
    from comfy_rft.errors import UserError

    with pytest.raises(UserError, match="no prompts"):
        node.run(text="\n# only a comment\n")


def test_reward_nodes_build_rewards_that_backpropagate_inside_inference_mode(defs):
    brightness = _run(defs, "RFTLoadReward_brightness").values[0]
    spec = _run(defs, "RFTLoadRewardSpec", spec="brightness(target=0.7)").values[0]
    combined = _run(defs, "RFTCombineRewards", reward_1=brightness, weight_1=2.0, reward_2=spec, weight_2=-1.0).values[0]
    robust = _run(defs, "RFTRobustReward", reward=combined, rho=0.01, mode="adversarial", samples=4).values[0]
    assert combined.differentiable and robust.differentiable and "brightness" in robust.name
    with torch.inference_mode(False), torch.enable_grad():
        images = torch.rand(2, 3, 16, 16, requires_grad=True)
        robust(images, ["a", "b"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    jpeg = _run(defs, "RFTLoadReward_jpeg", quality=80).values[0]
    assert not jpeg.differentiable and jpeg.quality == 80


def test_score_images_shows_each_score(defs):
    reward = _run(defs, "RFTLoadReward_brightness").values[0]
    images = torch.stack([torch.zeros(8, 8, 3), torch.ones(8, 8, 3)])  # ComfyUI IMAGE: [B,H,W,C]
    result = _run(defs, "RFTScoreImages", images=images, reward=reward, prompts=["dark", "bright"])
    mean, text = result.values
    assert mean == pytest.approx(0.5)
    assert "image 1: 0.0000" in text and "image 2: 1.0000" in text and result.text == [text]


def _fake_comfy_folders(monkeypatch, tmp_path):
    fp = types.ModuleType("folder_paths")
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)

    def names(kind):
        assert kind == "loras"
        return sorted(str(p.relative_to(loras)) for p in loras.rglob("*.safetensors"))

    fp.get_folder_paths = lambda kind: [str(loras)]
    fp.get_filename_list = names
    fp.get_full_path = lambda kind, name: str(loras / name) if (loras / name).is_file() else None
    fp.get_output_directory = lambda: str(tmp_path / "output")
    fp.get_temp_directory = lambda: str(tmp_path / "temp")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return loras


def test_save_then_load_lora_round_trip(defs, tmp_path, monkeypatch):
    from comfy_rft.nodes.payloads import LoraPayload

    loras = _fake_comfy_folders(monkeypatch, tmp_path)
    state = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4),
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    payload = LoraPayload(state, {"comfy_rft.method": "draft", "ss_network_dim": "4"})
    first = _run(defs, "RFTSaveLoRA", lora=payload, filename_prefix="rft/../my lora").values[0]
    second = _run(defs, "RFTSaveLoRA", lora=payload, filename_prefix="rft/../my lora").values[0]
    assert (first, second) == ("rft/my lora_00001.safetensors", "rft/my lora_00002.safetensors")
    assert (loras / first).is_file()
    load = {d.node_id: d for d in node_defs()}["RFTLoadLoRA"]
    assert first in load.inputs[0].choices()
    loaded = load.run(lora_name=first).values[0]
    assert loaded.metadata["modelspec.title"] == "my lora_00001" and loaded.metadata["comfy_rft.method"] == "draft"
    for key, tensor in state.items():
        assert torch.equal(loaded.state_dict[key], tensor)


def test_plot_node_draws_training_and_held_out_curves(defs, tmp_path, monkeypatch):
    from comfy_rft.nodes.payloads import TrainingLog

    _fake_comfy_folders(monkeypatch, tmp_path)
    log = TrainingLog(method="draft", reward="brightness", config={},
                      history=[{"step": s, "reward_mean": 0.1 * s} for s in range(1, 6)],
                      evaluations=[{"step": s, "reward": 0.1 * s, "heldout": {"aesthetic": 5 + s}} for s in (0, 5)])
    image = _run(defs, "RFTPlotTraining", log=log).values[0]
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.shape[1] > image.shape[2] / 2  # two panels stacked: training, held-out
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_optional_dependency_disables_one_node_not_the_pack(monkeypatch):
    from comfy_rft.nodes import rewards

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rapidocr_onnxruntime"
                        else real(name, *a))
    defs = {d.node_id: d for d in node_defs()}
    assert "rapidocr_onnxruntime" in defs["RFTLoadReward_ocr"].unavailable
    assert all(d.unavailable is None for k, d in defs.items() if k not in ("RFTLoadReward_ocr", "RFTPushLoRAToHub"))
    assert rewards.builtin_reward_node("brightness").unavailable is None


def test_push_node_sends_the_file_and_run_pictures_and_never_takes_a_token(defs, tmp_path, monkeypatch):
    import comfy_rft.hub as hub
    from comfy_rft.nodes.payloads import TrainingLog

    loras = _fake_comfy_folders(monkeypatch, tmp_path)
    (loras / "rft").mkdir()
    (loras / "rft" / "x.safetensors").write_bytes(b"")
    run = tmp_path / "run"
    run.mkdir()
    for picture in ("before_after.png", "reward_curve.png"):
        (run / picture).write_bytes(b"png")
    calls = []
    monkeypatch.setattr(hub, "push_lora", lambda path, repo, **kw: calls.append((path, repo, kw)) or "https://hub/x")
    node = {d.node_id: d for d in node_defs()}["RFTPushLoRAToHub"]
    assert not any("token" in i.name.lower() for i in node.inputs)
    log = TrainingLog(method="draft", reward="aesthetic", config={"lr": 0.1}, run_dir=str(run),
                      summary={"reward_before": 1.0, "reward_after": 2.0})
    result = node.run(lora_name="rft/x.safetensors", repo_id="me/x", private=True, log=log)
    assert result.values == ("https://hub/x",)
    path, repo, kwargs = calls[0]
    assert path == loras / "rft" / "x.safetensors" and repo == "me/x" and kwargs["private"] is True
    assert kwargs["samples"] == [run / "before_after.png"] and kwargs["reward_curve"] == run / "reward_curve.png"
    assert kwargs["config"] == {"method": "draft", "lr": 0.1} and kwargs["metrics"]["reward_after"] == 2.0


def test_seed_widgets_never_get_the_frontends_randomize_control(infos):
    """The frontend adds a 'control after generate' widget (default: randomize) to any INT called seed unless the
    input says otherwise: a trainer would retrain on every run and saved widget values would shift."""
    for key in METHODS:
        info = infos[f"RFTTrain_{key}"]
        assert info["input"]["required"]["seed"][1]["control_after_generate"] is False
        assert "seed:control_after_generate" not in widget_names(info)
    assert "seed:control_after_generate" in widget_names(STOCK_NODES["KSampler"])
