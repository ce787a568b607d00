"""Group planning without dispatching: real transformers models at tiny configs, real checkpoint files, no hooks."""

import pytest
import torch
from helpers import tiny_llama, tiny_lm
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from accel_nvme.planning import (
    expand_entries,
    merge_groups,
    no_split_classes,
    plan_dispatch,
    plan_groups,
    tensor_source,
)
from accel_nvme.store import CheckpointTensor, GroupPlan

LAYERS = [f"model.layers.{i}" for i in range(4)]


def plan(model, device_map, main_device="cpu", index=None, group_bytes=0):
    return plan_dispatch(model, device_map, main_device, index or {}, {}, False, group_bytes)


def tiny_clip():
    torch.manual_seed(0)
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision = {**text, "image_size": 8, "patch_size": 4}
    return CLIPModel(CLIPConfig(text_config={**text, "vocab_size": 64}, vision_config=vision, projection_dim=8)).eval()


def test_a_whole_llama_splits_into_its_decoder_layers_and_leaves():
    model = tiny_llama()
    entries, kept, placed = expand_entries(model, [""], no_split_classes(model), offload_buffers=False)
    assert [name for name, _ in entries] == ["model.embed_tokens", *LAYERS, "model.norm", "lm_head"]
    assert all(module is model.get_submodule(name) for name, module in entries)
    assert kept == []
    assert placed == ["model.rotary_emb"], "only non-persistent buffers: accelerate places it, nothing is stored"


def test_a_decoder_layer_entry_is_one_group_and_a_module_list_is_split():
    model = tiny_llama()
    entries, _, _ = expand_entries(model, ["model.layers.1", "model.layers"], frozenset({"LlamaDecoderLayer"}), False)
    assert [name for name, _ in entries] == ["model.layers.1", "model.layers.0", "model.layers.2", "model.layers.3"]


def test_tensors_a_split_module_holds_itself_stay_resident():
    model = tiny_clip()
    result = plan(model, {"": "nvme"})
    assert "logit_scale" in result.kept
    assert result.device_map["logit_scale"] == "cpu"
    stored = {name for group in result.groups for name in group.tensors}
    assert "logit_scale" not in stored
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in stored


def test_a_tied_weight_is_stored_once_by_the_first_group():
    model = tiny_llama(tie_word_embeddings=True)
    result = plan(model, {"": "nvme"})
    by_name = {group.name: group for group in result.entry_plans}
    assert "model.embed_tokens.weight" in by_name["model.embed_tokens"].tensors
    assert by_name["lm_head"].tensors == {}
    assert by_name["lm_head"].members == {"lm_head.weight": "model.embed_tokens.weight"}


def test_every_streamed_tensor_is_planned_once_and_untouched():
    model = tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = plan(model, {"": "nvme"})
    stored = [name for group in result.groups for name in group.tensors]
    assert sorted(stored) == sorted(name for name in before if "rotary_emb" not in name)
    for group in result.groups:
        for name, tensor in group.tensors.items():
            assert tensor is model.get_parameter(name), "the plan holds the model's own tensors, not copies"
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    assert not any(hasattr(module, "_hf_hook") for module in model.modules()), "planning attaches nothing"


def test_the_planned_device_map_names_each_hooked_module_and_keeps_other_entries():
    model = tiny_llama()
    result = plan(model, {"model.embed_tokens": "cpu", "model.layers": "nvme", "model.norm": "cpu", "lm_head": "cpu"})
    assert result.device_map == {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
        **dict.fromkeys(LAYERS, "nvme"),
    }
    assert [name for name, _ in result.entries] == LAYERS
    assert result.tensor_keys == []


def test_a_tensor_key_sent_elsewhere_stays_out_of_its_module_group():
    model = tiny_llama()
    key = "model.layers.0.input_layernorm.weight"
    result = plan(model, {"": "nvme", key: "cpu"})
    assert result.tensor_keys == [key]
    layer0 = next(group for group in result.entry_plans if group.name == "model.layers.0")
    assert key not in layer0.tensors and key not in layer0.members
    assert "model.layers.0.mlp.up_proj.weight" in layer0.tensors


def test_an_nvme_weight_tied_to_a_cpu_weight_is_refused_when_executing_on_a_gpu():
    model = tiny_llama(tie_word_embeddings=True)
    device_map = {"model": "cpu", "lm_head": "nvme"}
    with pytest.raises(ValueError, match=r"'lm_head.weight' \(nvme\) is tied to 'model.embed_tokens.weight'"):
        plan(model, device_map, main_device="cuda:0")
    assert plan(model, device_map).entry_plans[0].tensors == {}, "on the CPU the tied weight is simply not stored"


@pytest.mark.parametrize(
    ("budget", "names", "group_of_entry"),
    [
        (0, ["a", "b", "c"], [0, 1, 2]),
        (8, ["a+b", "c"], [0, 0, 1]),
        (12, ["a+b+c"], [0, 0, 0]),
        (3, ["a", "b", "c"], [0, 1, 2]),
    ],
)
def test_consecutive_groups_merge_within_the_budget(budget, names, group_of_entry):
    plans = [GroupPlan(name, {f"{name}.w": torch.zeros(1)}) for name in "abc"]  # 4 bytes each
    merged, of_entry = merge_groups(plans, budget)
    assert [group.name for group in merged] == names
    assert of_entry == group_of_entry
    assert sorted(name for group in merged for name in group.tensors) == ["a.w", "b.w", "c.w"]


def test_merging_follows_the_group_size_of_plan_dispatch():
    model = tiny_llama()
    layer = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters())
    result = plan(
        model,
        {"model.layers": "nvme", "model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu"},
        group_bytes=2 * layer,
    )
    assert [group.name for group in result.groups] == ["model.layers.0+model.layers.1", "model.layers.2+model.layers.3"]
    assert result.group_of_entry == [0, 0, 1, 1]


def test_a_meta_tensor_is_read_from_the_checkpoint_the_index_names(tmp_path):
    model = tiny_lm(tie=False)
    checkpoint = tmp_path / "model.safetensors"
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, checkpoint)
    meta = torch.empty_like(model.head.weight, device="meta")
    index = {"head.weight": {"safetensors_file": str(checkpoint), "weight_name": "head.weight", "dtype": "float32"}}
    source = tensor_source(["head.weight"], meta, index, {})
    assert isinstance(source, CheckpointTensor)
    assert torch.equal(source.load(), model.head.weight)
    with pytest.raises(ValueError, match=r"'head.weight' is on the meta device and the offload index has no entry"):
        tensor_source(["head.weight"], meta, {}, {})


def test_plan_groups_takes_a_meta_weight_by_any_of_its_tied_names(tmp_path):
    model = tiny_lm()
    checkpoint = tmp_path / "model.safetensors"
    save_file({"head.weight": model.head.weight.detach().clone()}, checkpoint)
    expected = model.head.weight.detach().clone()
    model.embed.weight = model.head.weight = torch.nn.Parameter(torch.empty_like(expected, device="meta"))
    index = {"head.weight": {"safetensors_file": str(checkpoint), "weight_name": "head.weight"}}
    groups = [("embed", model.embed), ("head", model.head)]
    device_map = {"": "cpu", "embed": "nvme", "head": "nvme"}
    embed, head = plan_groups(model, groups, [], False, "cpu", index, {}, device_map)
    source = embed.tensors["embed.weight"]
    assert isinstance(source, CheckpointTensor), "found under its other name, head.weight"
    assert torch.equal(source.load(), expected)
    assert head.tensors == {} and head.members == {"head.weight": "embed.weight"}
