"""Real transformers and diffusers classes at tiny configs, with inputs and the output the conformance suite compares.

Each ``Spec`` builds a seeded model in eval mode, its inputs, and ``run(model, inputs)``: the tensor that must be
``torch.equal`` between the model in RAM and the same model offloaded. Hidden sizes are 32-64 with two layers, so
a model saves and loads in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

VOCAB = 128


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _ids(batch: int = 1, length: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=_gen())


def _first(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs)[0]


def _diffusers_first(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


@dataclass(frozen=True)
class Spec:
    """One model class at a tiny config: how to build it, its inputs, and the output compared."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    run: Callable[[nn.Module, dict], torch.Tensor] = _first
    library: str = "transformers"
    generate: bool = False
    extra: dict = field(default_factory=dict)


def _seeded(make: Callable[[], nn.Module], drawn: str | None = None) -> nn.Module:
    """``make()`` from seed 0, in eval mode; ``drawn`` names a tensor initialized to a constant (zeros), drawn at
    random here so that a wrong copy of it would change the output."""
    torch.manual_seed(0)
    model = make().eval()
    if drawn is not None:
        with torch.no_grad():
            getattr(model, drawn).normal_(generator=_gen())
    return model


TINY = dict(  # the transformers config fields most tiny models here share
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_fields(without: tuple[str, ...] = (), **overrides) -> dict:
    """``TINY`` less the fields ``without`` names (a config class that has no such field), with ``overrides``."""
    return {**{key: value for key, value in TINY.items() if key not in without}, **overrides}


def decoder_config(config_class, **overrides):
    """A tiny decoder-only config (grouped-query attention: two key/value heads) of ``config_class``."""
    return config_class(**tiny_fields(num_key_value_heads=2, **overrides))


def _causal_lm(config_name: str, model_name: str, **overrides) -> Callable[[], nn.Module]:
    def build():
        import transformers

        config = decoder_config(getattr(transformers, config_name), **overrides)
        return _seeded(lambda: getattr(transformers, model_name)(config))

    return build


def _lm_inputs() -> dict:
    ids = _ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    return _seeded(lambda: GPT2LMHeadModel(config))


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return _seeded(lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**TINY)))


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**tiny_fields(("intermediate_size",), ffn_dim=64, word_embed_proj_dim=32))
    return _seeded(lambda: OPTForCausalLM(config))


def falcon():
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(**tiny_fields(("intermediate_size", "max_position_embeddings")))
    return _seeded(lambda: FalconForCausalLM(config))


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return _seeded(lambda: T5ForConditionalGeneration(_t5_config(T5Config)))


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return _seeded(lambda: T5EncoderModel(_t5_config(T5Config)))


def _t5_config(config_class):
    return config_class(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )


def _seq2seq_inputs() -> dict:
    ids = _ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": _ids(1, 4)}


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return _seeded(lambda: BartForConditionalGeneration(config), drawn="final_logits_bias")


def bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(**tiny_fields(("bos_token_id", "eos_token_id")))
    return _seeded(lambda: BertModel(config))


def _clip_text() -> dict:
    return tiny_fields(max_position_embeddings=32, projection_dim=16)


def _clip_vision() -> dict:
    return dict(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=16,
    )


def clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    return _seeded(lambda: CLIPTextModel(CLIPTextConfig(**_clip_text())))


def clip_text_projection():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return _seeded(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**_clip_text())))


def clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=_clip_text(), vision_config=_clip_vision(), projection_dim=16)
    return _seeded(lambda: CLIPModel(config))


def _pixels(size: int = 16) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=_gen())


def _clip_inputs() -> dict:
    ids = _ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": _pixels()}


def vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return _seeded(lambda: ViTModel(config))


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return _seeded(lambda: WhisperForConditionalGeneration(config))


def _whisper_inputs() -> dict:
    return {"input_features": torch.randn(1, 8, 32, generator=_gen()), "decoder_input_ids": _ids(1, 4)}


def _denoiser_inputs(
    hidden: tuple[int, ...], text: tuple[int, ...] = (1, 6, 16), pooled: int | None = None, **extra
) -> dict:
    """Random latents, text embeddings and (with ``pooled``) pooled projections, drawn in that order, timestep 3."""
    g = _gen()
    inputs = {
        "hidden_states": torch.randn(*hidden, generator=g),
        "encoder_hidden_states": torch.randn(*text, generator=g),
        "timestep": torch.tensor([3]),
    }
    if pooled is not None:
        inputs["pooled_projections"] = torch.randn(1, pooled, generator=g)
    return {**inputs, **extra}


def flux():
    from diffusers import FluxTransformer2DModel

    return _seeded(
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            axes_dims_rope=(2, 2, 4),
        )
    )


def _flux_inputs() -> dict:
    ids = {"img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3)}
    return _denoiser_inputs((1, 16, 4), (1, 5, 16), pooled=8, timestep=torch.tensor([0.5]), **ids)


def wan():
    from diffusers import WanTransformer3DModel

    return _seeded(
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        drawn="scale_shift_table",
    )


def _wan_inputs() -> dict:
    return _denoiser_inputs((1, 4, 2, 8, 8))


def sd3():
    from diffusers import SD3Transformer2DModel

    return _seeded(
        lambda: SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            out_channels=4,
            pos_embed_max_size=16,
        )
    )


def _sd3_inputs() -> dict:
    return _denoiser_inputs((1, 4, 8, 8), (1, 6, 32), pooled=16)


def pixart():
    from diffusers import PixArtTransformer2DModel

    return _seeded(
        lambda: PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
        drawn="scale_shift_table",
    )


def _pixart_inputs() -> dict:
    return _denoiser_inputs((1, 4, 8, 8), (1, 6, 32), added_cond_kwargs={"aspect_ratio": None, "resolution": None})


def unet():
    from diffusers import UNet2DConditionModel

    return _seeded(
        lambda: UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    )


def _unet_inputs() -> dict:
    g = _gen()
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([3]),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
    }


def vae():
    from diffusers import AutoencoderKL

    return _seeded(
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
        )
    )


def _vae_decode(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model.decode(**inputs).sample


def cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    return _seeded(
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            time_embed_dim=8,
            text_embed_dim=16,
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=5,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=6,
        )
    )


def _cogvideox_inputs() -> dict:
    return _denoiser_inputs((1, 2, 4, 8, 8))


def ltx_video():
    from diffusers import LTXVideoTransformer3DModel

    return _seeded(
        lambda: LTXVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=16,
        ),
        drawn="scale_shift_table",
    )


def _ltx_inputs() -> dict:
    return _denoiser_inputs((1, 2 * 4 * 4, 4), encoder_attention_mask=torch.ones(1, 6), num_frames=2, height=4, width=4)


def hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    return _seeded(
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4),
        )
    )


def _hunyuan_inputs() -> dict:
    return _denoiser_inputs(
        (1, 4, 1, 4, 4), pooled=8, encoder_attention_mask=torch.ones(1, 6), guidance=torch.tensor([1000.0])
    )


def _diffusers(name, build, inputs, run=_diffusers_first) -> Spec:
    return Spec(name, build, inputs, run, library="diffusers")


SPECS: dict[str, Spec] = {
    spec.name: spec
    for spec in (
        Spec("llama", _causal_lm("LlamaConfig", "LlamaForCausalLM"), _lm_inputs, generate=True),
        Spec("qwen2", _causal_lm("Qwen2Config", "Qwen2ForCausalLM"), _lm_inputs, generate=True),
        Spec("mistral", _causal_lm("MistralConfig", "MistralForCausalLM"), _lm_inputs),
        Spec("gemma", _causal_lm("GemmaConfig", "GemmaForCausalLM", head_dim=8), _lm_inputs),
        Spec("phi3", _causal_lm("Phi3Config", "Phi3ForCausalLM"), _lm_inputs),
        Spec("gpt2", gpt2, _lm_inputs, generate=True),
        Spec("gpt_neox", gpt_neox, _lm_inputs),
        Spec("opt", opt, _lm_inputs),
        Spec("falcon", falcon, _lm_inputs),
        Spec(
            "mixtral",
            _causal_lm("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
            _lm_inputs,
        ),
        Spec("t5", t5, _seq2seq_inputs, generate=True),
        Spec("t5_encoder", t5_encoder, _lm_inputs),
        Spec("bart", bart, _seq2seq_inputs, generate=True),
        Spec("bert", bert, _lm_inputs),
        Spec("clip_text", clip_text, _lm_inputs),
        Spec("clip_text_projection", clip_text_projection, _lm_inputs),
        Spec("clip", clip, _clip_inputs, lambda m, x: m(**x).logits_per_image),
        Spec("vit", vit, lambda: {"pixel_values": _pixels()}),
        Spec("whisper", whisper, _whisper_inputs),
        _diffusers("flux", flux, _flux_inputs),
        _diffusers("wan", wan, _wan_inputs),
        _diffusers("sd3", sd3, _sd3_inputs),
        _diffusers("pixart", pixart, _pixart_inputs),
        _diffusers("unet", unet, _unet_inputs),
        _diffusers("vae_decode", vae, lambda: {"z": torch.randn(1, 4, 4, 4, generator=_gen())}, _vae_decode),
        _diffusers("cogvideox", cogvideox, _cogvideox_inputs),
        _diffusers("ltx_video", ltx_video, _ltx_inputs),
        _diffusers("hunyuan_video", hunyuan_video, _hunyuan_inputs),
    )
}
