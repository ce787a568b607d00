"""A tiny MoE model in the manner of remote code: each expert a module of its own in an ``nn.ModuleList``, and the MoE
module calling only the experts a token is routed to, the way DeepSeek-V3's ``moe_infer`` (``moe_style="deepseek"``,
every expert in training mode) or transformers 4's Mixtral (``moe_style="mixtral"``) do."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tiny_moe import TinyMoeConfig


class TinyMoeMLP(nn.Module):
    def __init__(self, config, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(
            [TinyMoeMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)]
        )
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = TinyMoeMLP(config, shared) if config.n_shared_experts else None

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        weights, index = torch.topk(self.gate(x).softmax(dim=-1), self.top_k, dim=-1)
        if self.config.moe_style == "mixtral":
            y = self.mixtral(x, index, weights)
        elif self.training:
            y = self.every_expert(x, index, weights)
        else:
            y = self.moe_infer(x, index, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.reshape(shape)

    def every_expert(self, x, index, weights):
        x = x.repeat_interleave(self.top_k, dim=0)
        flat = index.reshape(-1)
        y = torch.empty_like(x)
        for i, expert in enumerate(self.experts):
            y[flat == i] = expert(x[flat == i]).to(y.dtype)
        return (y.view(*weights.shape, -1) * weights.unsqueeze(-1)).sum(dim=1)

    @torch.no_grad()
    def moe_infer(self, x, index, weights):
        counts = index.new_zeros((index.shape[0], len(self.experts))).scatter_(1, index, 1).sum(dim=0)
        order = index.reshape(-1).argsort()
        tokens = x[order // index.shape[1]]
        outputs, start = [], 0
        for i, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            outputs.append(self.experts[i](tokens[start : start + count]))
            start += count
        done = torch.cat(outputs, dim=0)
        y = torch.empty_like(done)
        y[order] = done
        return (y.view(*index.shape, -1) * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)

    def mixtral(self, x, index, weights):
        y = torch.zeros_like(x)
        mask = F.one_hot(index, num_classes=len(self.experts)).permute(2, 1, 0)
        for i in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().reshape(-1).tolist():
            slot, token = torch.where(mask[i])
            y.index_add_(0, token, self.experts[i](x[token]) * weights[token, slot, None])
        return y


class TinyMoeAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, past_key_values):
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).transpose(1, 3).unbind(dim=2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        mask = torch.ones(length, k.shape[2], dtype=torch.bool).tril(k.shape[2] - length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, hidden))


class TinyMoeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size)
        self.self_attn = TinyMoeAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size)
        self.mlp = TinyMoeBlock(config)

    def forward(self, x, past_key_values=None):
        x = x + self.self_attn(self.input_layernorm(x), past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyMoePreTrainedModel(PreTrainedModel):
    config_class = TinyMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ("TinyMoeDecoderLayer",)


class TinyMoeModel(TinyMoePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList([TinyMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size)
        self.post_init()

    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x, past_key_values)
        return self.norm(x), past_key_values


class TinyMoeForCausalLM(TinyMoePreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = TinyMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, past_key_values=None, use_cache=None, labels=None, **kwargs):
        hidden, past_key_values = self.model(input_ids, past_key_values, use_cache)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
