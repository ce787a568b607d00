"""Ten real diffusers pipelines at tiny configs, with character-level tokenizers built in memory (no hub access).

``PIPELINES[name]`` is a ``Tiny``: ``build()`` gives the pipeline in eval mode (seeded; the denoiser is the
conformance suite's config where its sizes fit), ``call`` the keyword arguments of a 2-step call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from conformance_models import SPECS

CHARS = [chr(c) for c in range(32, 127)]


def clip_tokenizer():
    """Byte-level CLIP BPE without merges: one token per character."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=16)


def t5_tokenizer():
    """A unigram T5 tokenizer over printable ASCII (ids below 100)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), *((c, -2.0) for c in CHARS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _byte_level(tokenizer_class, specials: list[str], **kwargs):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), *specials]
    return tokenizer_class(vocab={t: i for i, t in enumerate(tokens)}, merges=[], **kwargs)


def clip_text(projection: int | None = None, hidden: int = 32, vocab: int = 514):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=1,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=2,
        projection_dim=projection or hidden,
        max_position_embeddings=77,
    )
    model_class = CLIPTextModel if projection is None else CLIPTextModelWithProjection
    return _seed(lambda: model_class(config))


def t5_encoder(d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=128,
        d_model=d_model,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _seed(lambda: model_class(config))


def _seed(make):
    torch.manual_seed(0)
    return make().eval()


def _kl_vae(latent_channels: int, block_out_channels=(4,), **kwargs):
    from diffusers import AutoencoderKL

    return _seed(
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
            block_out_channels=block_out_channels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=1,
            sample_size=8,
            **kwargs,
        )
    )


def flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_kl_vae(1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5),
        text_encoder=clip_text(hidden=8),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(16),
        tokenizer_2=t5_tokenizer(),
        transformer=SPECS["flux"].build(),
    )


def sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_kl_vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5),
        text_encoder=clip_text(projection=8, hidden=16),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(projection=8, hidden=16),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(32),
        tokenizer_3=t5_tokenizer(),
        transformer=SPECS["sd3"].build(),
    )


def wan():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = _seed(
        lambda: AutoencoderKLWan(
            base_dim=3,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        )
    )
    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(16, umt5=True),
        transformer=SPECS["wan"].build(),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = _seed(
        lambda: UNet2DConditionModel(
            block_out_channels=(4, 8),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16,
            cross_attention_dim=32 + 16,
            norm_num_groups=1,
        )
    )
    return StableDiffusionXLPipeline(
        vae=_kl_vae(4, block_out_channels=(4, 8)),
        text_encoder=clip_text(hidden=32),
        text_encoder_2=clip_text(projection=16, hidden=16),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )


def ltx():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline

    vae = _seed(
        lambda: AutoencoderKLLTXVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4,
            timestep_conditioning=False,
            patch_size=1,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        )
    )
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=t5_encoder(16),
        tokenizer=t5_tokenizer(),
        transformer=SPECS["ltx_video"].build(),
    )


def hunyuan_video():
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel, LlamaTokenizerFast

    vae = _seed(
        lambda: AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        )
    )
    llama = LlamaConfig(
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>", "<pad>"]
    tokenizer = _byte_level(LlamaTokenizerFast, specials, bos_token="<|begin_of_text|>", pad_token="<pad>")
    return HunyuanVideoPipeline(
        text_encoder=_seed(lambda: LlamaModel(llama)),
        tokenizer=tokenizer,
        transformer=SPECS["hunyuan_video"].build(),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip_text(hidden=8),
        tokenizer_2=clip_tokenizer(),
    )


def qwen_image():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    transformer = _seed(
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=3,
            joint_attention_dim=16,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        )
    )
    vae = _seed(
        lambda: AutoencoderKLQwenImage(
            base_dim=24,
            z_dim=4,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        )
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": 300,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=300,
    )
    tokenizer = _byte_level(Qwen2Tokenizer, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_seed(lambda: Qwen2_5_VLForConditionalGeneration(config)),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def pixart_sigma():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    return PixArtSigmaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(32),
        vae=_kl_vae(4),
        transformer=SPECS["pixart"].build(),
        scheduler=DPMSolverMultistepScheduler(),
    )


def cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    vae = _seed(
        lambda: AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        )
    )
    return CogVideoXPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(16),
        vae=vae,
        transformer=SPECS["cogvideox"].build(),
        scheduler=CogVideoXDDIMScheduler(),
    )


def sana():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

    transformer = _seed(
        lambda: SanaTransformer2DModel(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=4,
            num_cross_attention_heads=2,
            cross_attention_head_dim=4,
            cross_attention_dim=8,
            caption_channels=8,
            sample_size=8,
        )
    )
    vae = _seed(
        lambda: AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=[1, 1],
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        )
    )
    gemma = Gemma2Config(
        head_dim=8,
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=2,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    tokenizer = _byte_level(GemmaTokenizerFast, ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=_seed(lambda: Gemma2Model(gemma)),
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


@dataclass(frozen=True)
class Tiny:
    """A tiny pipeline: how to build it, and the keyword arguments of the call compared (besides ``generator``)."""

    build: Callable
    call: dict


_IMAGE = dict(height=8, width=8, num_inference_steps=2, output_type="pt")
_VIDEO = dict(height=16, width=16, num_frames=5, num_inference_steps=2, output_type="pt")

PIPELINES: dict[str, Tiny] = {
    "flux": Tiny(flux, {**_IMAGE, "max_sequence_length": 16}),
    "sd3": Tiny(sd3, {**_IMAGE, "max_sequence_length": 16}),
    "wan": Tiny(wan, {**_VIDEO, "max_sequence_length": 16}),
    "sdxl": Tiny(sdxl, {**_IMAGE, "height": 16, "width": 16}),
    "ltx": Tiny(ltx, {**_VIDEO, "height": 32, "width": 32, "max_sequence_length": 16}),
    "hunyuan_video": Tiny(hunyuan_video, {**_VIDEO, "max_sequence_length": 16}),
    "qwen_image": Tiny(qwen_image, {**_IMAGE, "height": 16, "width": 16, "max_sequence_length": 16}),
    "pixart_sigma": Tiny(pixart_sigma, {**_IMAGE, "max_sequence_length": 16, "use_resolution_binning": False}),
    "cogvideox": Tiny(cogvideox, {**_VIDEO, "max_sequence_length": 6}),
    "sana": Tiny(
        sana,
        {**_IMAGE, "height": 32, "width": 32, "max_sequence_length": 16, "use_resolution_binning": False}
        | {"complex_human_instruction": None},
    ),
}
