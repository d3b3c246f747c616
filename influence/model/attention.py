"""Attention as layers kronfluence can track. Two kinds of torchvision attention apply their projections
functionally, so no hook would see them and about a third of a transformer's parameters would be left out
of the scores:
- `nn.MultiheadAttention` (ViT) uses bare parameters (`in_proj_weight`, and `out_proj.weight` of a Linear
  whose forward it never calls). `SelfAttention` computes the same function from the same parameter
  tensors through two `nn.Linear` layers (`in_proj`, `out_proj`) and `F.scaled_dot_product_attention`.
- Swin's `ShiftedWindowAttention` (V1 and V2) calls `F.linear` with its `qkv` and `proj` Linear layers'
  weights. `LayerCalling` runs it with those calls redirected to the layers themselves (a torch function
  mode), so their hooks run and the function is unchanged; Swin V2 zeroes the key part of its `qkv` bias
  inside the call, which is added back as the difference (kronfluence then counts that part's gradient,
  which is zero in the model: 1/3 of one bias vector per block).
The swap happens once the weights are loaded, so checkpoints and torchvision's weights keep their own keys."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models.swin_transformer import ShiftedWindowAttention

# Attention modules that call F.linear with these Linear layers' weights (ShiftedWindowAttentionV2 is a subclass).
LINEAR_CALLERS = {ShiftedWindowAttention: ("qkv", "proj")}


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


class _LayerCalls(TorchFunctionMode):
    """Inside it, `F.linear(x, layer.weight, bias)` for the named layers of `owner` is `layer(x)` (kronfluence's
    wrapper of it, once wrapped), plus the difference when `bias` is not the layer's own. Swin applies them
    to windows stacked along the first dimension (batch x windows, image-major): the layer sees them as
    `batch` examples of all their windows' tokens, as kronfluence's per-example gradients need."""

    def __init__(self, owner: nn.Module, names: Sequence[str], batch: int) -> None:
        super().__init__()
        self.owner, self.names, self.batch = owner, names, batch

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            for name in self.names:
                layer = getattr(self.owner, name)
                inner = getattr(layer, "original_module", layer)  # kronfluence's TrackedModule keeps the layer
                if args[1] is inner.weight:
                    bias = args[2] if len(args) > 2 else kwargs.get("bias")
                    tokens = args[0]
                    output = layer(tokens.reshape(self.batch, -1, tokens.shape[-1])).reshape(*tokens.shape[:-1], -1)
                    return output if bias is inner.bias else output + (bias - inner.bias)
        return func(*args, **kwargs)


class LayerCalling(nn.Module):
    """Runs `inner` with its `F.linear` calls on the weights of the layers `names` made through the layers."""

    def __init__(self, inner: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.inner = inner
        self.names = tuple(names)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with _LayerCalls(self.inner, self.names, inputs.shape[0]):
            return self.inner(inputs)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], module)


def make_attention_trackable(model: nn.Module) -> nn.Module:
    """Replaces every `nn.MultiheadAttention` in `model` by a `SelfAttention` over the same parameters, and
    runs every Swin attention through `LayerCalling`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            _replace(model, name, SelfAttention(module))
        callers = [names for kind, names in LINEAR_CALLERS.items() if isinstance(module, kind)]
        if callers:
            _replace(model, name, LayerCalling(module, callers[0]))
    return model
