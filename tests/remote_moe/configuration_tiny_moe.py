"""A tiny MoE config in the manner of remote code (DeepSeek-V2/V3's, transformers 4's Mixtral): loaded with
``trust_remote_code=True`` from a saved folder."""

from transformers import PretrainedConfig


class TinyMoeConfig(PretrainedConfig):
    model_type = "tiny_moe"

    def __init__(
        self,
        vocab_size=128,
        hidden_size=32,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        max_position_embeddings=64,
        moe_style="deepseek",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.max_position_embeddings = max_position_embeddings
        self.moe_style = moe_style
        super().__init__(**{"tie_word_embeddings": False, **kwargs})
