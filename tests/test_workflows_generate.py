"""transformers workflows on models streamed whole from nvme ({"": "nvme"}): ``generate``, ``pipeline()``, a
vision tower under ``no_grad``; each equal to RAM."""

import pytest
import torch
from conformance_models import SPECS, _causal_lm
from safetensors.torch import load_file
from tiny_pipelines import _byte_level
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Qwen2Tokenizer, pipeline

import accel_nvme
from accel_nvme import NvmeAlignDevicesHook

VOCAB = 300  # room for the byte-level tokenizer of the pipeline() test
IDS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
BUILD = {
    "llama": _causal_lm("LlamaConfig", "LlamaForCausalLM", vocab_size=VOCAB),
    "qwen3": _causal_lm("Qwen3Config", "Qwen3ForCausalLM", vocab_size=VOCAB, head_dim=8),
    "t5": SPECS["t5"].build,
    "bart": SPECS["bart"].build,
}
MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(do_sample=False, num_beams=2),
    "sample": dict(do_sample=True, top_k=20, temperature=0.9),
    "static_cache": dict(do_sample=False, cache_implementation="static"),
}


DECODERS = ["llama", "qwen3"]
CASES = [(name, mode) for name in BUILD for mode in MODES if name in DECODERS or mode == "beam"]


@pytest.fixture(scope="module", params=list(BUILD))
def loaded(request, tmp_path_factory):
    """The model in RAM, and the same saved and loaded with every module on the nvme tier."""
    model = BUILD[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder / "checkpoint")
    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    streamed = auto.from_pretrained(
        folder / "checkpoint", device_map={"": "nvme"}, offload_folder=str(folder / "offload")
    ).eval()
    assert len(accel_nvme.stats(streamed).modules) >= 4, "streamed block by block"
    return model, streamed


def generate(model, mode):
    torch.manual_seed(0)
    out = model.generate(
        IDS,
        attention_mask=torch.ones_like(IDS),
        max_new_tokens=6,
        output_scores=True,
        return_dict_in_generate=True,
        **MODES[mode],
    )
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("loaded, mode", CASES, indirect=["loaded"])
def test_generate_is_exact(loaded, mode):
    model, streamed = loaded
    sequences, scores = generate(model, mode)
    got_sequences, got_scores = generate(streamed, mode)
    assert torch.equal(got_sequences, sequences)
    assert torch.equal(got_scores, scores), "scores bit for bit (streamed weights keep requires_grad)"


def test_map_and_stats_show_what_streams_and_save_still_works(loaded, tmp_path):
    model, streamed = loaded
    modules = accel_nvme.stats(streamed).modules
    hooked = [n for n, m in streamed.named_modules() if isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook)]
    assert modules == hooked
    assert set(streamed.hf_device_map) >= set(modules)
    assert all(streamed.hf_device_map[n] == "nvme" for n in modules), "the map names the tier"
    assert repr(streamed.hf_device_map[modules[0]]) == "'nvme'"
    assert "disk" in streamed.hf_device_map.values(), "transformers still sees its disk tier (no compile, save)"
    assert streamed.device == torch.device("cpu"), "the device it computes on, not meta"
    streamed.save_pretrained(tmp_path / "resaved")
    resaved = load_file(tmp_path / "resaved" / "model.safetensors")
    expected = model.state_dict()
    for key, tensor in resaved.items():
        assert torch.equal(tensor, expected[key]), key


@pytest.mark.parametrize("loaded", DECODERS, indirect=True)
def test_text_generation_pipeline_accepts_a_streamed_model(loaded):
    model, streamed = loaded
    tokenizer = _byte_level(Qwen2Tokenizer, ["<|endoftext|>"])

    def run(m):
        generator = pipeline("text-generation", model=m, tokenizer=tokenizer)
        return generator("A cat", max_new_tokens=5, do_sample=False, return_tensors=True)

    got = run(streamed)
    assert got == run(model)
    assert streamed.hf_device_map[accel_nvme.stats(streamed).modules[0]] == "nvme", "the map is kept"


def test_siglip_pooling_head_under_no_grad(tmp_path):
    """Its ``nn.MultiheadAttention`` head: torch's matmul picks its kernel partly on ``weight.requires_grad``."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4
    )
    torch.manual_seed(0)
    model = SiglipVisionModel(config).eval()
    model.save_pretrained(tmp_path / "siglip")
    streamed = SiglipVisionModel.from_pretrained(
        tmp_path / "siglip", device_map={"": "nvme"}, offload_folder=str(tmp_path / "offload")
    )
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(pixel_values=pixels), streamed(pixel_values=pixels)
    assert len(accel_nvme.stats(streamed).modules) > 2
    assert torch.equal(got.pooler_output, expected.pooler_output)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
