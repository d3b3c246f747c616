"""A vision transformer's attention as layers kronfluence can track. `nn.MultiheadAttention` applies its
input and output projections functionally to bare parameters (`in_proj_weight`, and `out_proj.weight` of
a Linear whose forward it never calls), so no hook sees them and a third of ViT-B/16's parameters would be
left out of the scores. `SelfAttention` computes the same function from the same parameter tensors through
two `nn.Linear` layers (`in_proj`, `out_proj`) and `F.scaled_dot_product_attention`; the swap happens once
the weights are loaded, so checkpoints and torchvision's weights keep their own keys."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _linear_over(weight: nn.Parameter, bias: Optional[nn.Parameter]) -> nn.Linear:
    """An nn.Linear holding these very parameters (no copy, no new initialisation)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = weight
    layer.bias = bias
    return layer


class SelfAttention(nn.Module):
    """`nn.MultiheadAttention` restricted to self-attention without masks (what torchvision's vision
    transformers call it with), through trackable Linear layers."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        if not attention._qkv_same_embed_dim or attention.bias_k is not None:
            raise ValueError("only attention with one packed input projection and no added key/value bias can be tracked")
        self.num_heads = attention.num_heads
        self.batch_first = attention.batch_first
        self.dropout = attention.dropout
        self.in_proj = _linear_over(attention.in_proj_weight, attention.in_proj_bias)
        self.out_proj = _linear_over(attention.out_proj.weight, attention.out_proj.bias)

    def forward(  # the signature nn.MultiheadAttention is called with
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True, attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> Tuple[torch.Tensor, None]:
        if not (query is key and key is value) or key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotImplementedError("SelfAttention computes unmasked self-attention only")
        tokens = query if self.batch_first else query.transpose(0, 1)
        batch, length, width = tokens.shape
        q, k, v = self.in_proj(tokens).view(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        output = self.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))
        return (output if self.batch_first else output.transpose(0, 1)), None


def make_attention_trackable(model: nn.Module) -> nn.Module:
    """Replaces every `nn.MultiheadAttention` in `model` by a `SelfAttention` over the same parameters."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], SelfAttention(module))
    return model
