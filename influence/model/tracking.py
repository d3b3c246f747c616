"""Which of a model's parameters the influence scores cover. kronfluence hooks `nn.Linear` and `nn.Conv2d`
layers; here they are found whatever their subclass (a transformer's attention is made trackable first:
influence/model/attention.py). What is left out (normalisation layers, class tokens,
position embeddings, layer scales, Swin's relative position biases) and what kronfluence approximates
(grouped and depthwise convolutions: their inputs are averaged over the channel groups) is stated in one
line at start, in the run record and in docs/usage.md."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Tuple

from kronfluence.module.tracked_module import TrackedModule
from torch import nn

from influence.model.attention import LINEAR_CALLERS, LayerCalling
from influence.runtime.cli import UserError

TRACKED_TYPES = (nn.Linear, nn.Conv2d)
# Layers that apply their sub-layers' parameters functionally: no hook sees those unless attention.py has
# rebuilt them (MultiheadAttention) or runs them through LayerCalling (Swin's).
FUNCTIONAL_OWNERS = (nn.MultiheadAttention, *LINEAR_CALLERS)
NORMALISATION_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def tracked_named_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, layer) of every Linear and Conv2d (subclasses included) that runs as a layer, in module order:
    not the output projection `nn.MultiheadAttention` applies functionally. On a model kronfluence has
    wrapped, the wrapped layers themselves (named `...original_module`)."""
    skipped = _functional_prefixes(model)
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, TRACKED_TYPES) and not name.startswith(skipped)
    ]


def _functional_prefixes(model: nn.Module) -> Tuple[str, ...]:
    called = {id(module.inner) for module in model.modules() if isinstance(module, LayerCalling)}
    return tuple(
        f"{name}." for name, module in model.named_modules() if isinstance(module, FUNCTIONAL_OWNERS) and id(module) not in called
    )


def tracked_layers(model: nn.Module) -> List[nn.Module]:
    return [module for _, module in tracked_named_layers(model)]


def tracked_module_names(model: nn.Module) -> List[str]:
    """What the kronfluence Task tracks (`get_influence_tracked_modules`), for a model not yet wrapped."""
    return [name for name, _ in tracked_named_layers(model)]


def register_subclasses(model: nn.Module) -> None:
    """kronfluence finds layers with isinstance but picks its wrapper by exact type: a subclass of Linear or
    Conv2d gets the wrapper of its base class."""
    for module in tracked_layers(model):
        for base in TRACKED_TYPES:
            if isinstance(module, base):
                TrackedModule.SUPPORTED_MODULES.setdefault(type(module), TrackedModule.SUPPORTED_MODULES[base])


def _untracked_kind(owner: nn.Module, parameter_name: str) -> str:
    # An untracked Linear or Conv2d is one inside a FUNCTIONAL_OWNER; MultiheadAttention holds its input projection bare.
    if isinstance(owner, TRACKED_TYPES) or (isinstance(owner, nn.MultiheadAttention) and parameter_name.startswith("in_proj")):
        return "attention projections (applied functionally)"
    if isinstance(owner, NORMALISATION_TYPES):
        return "normalisation layers"
    if len(list(owner.children())) > 0:  # held by a block itself: class token, position embedding, layer scale
        return parameter_name
    return f"{type(owner).__name__} layers"


def describe_tracking(model: nn.Module) -> Dict[str, Any]:
    """What the scores cover: parameters tracked and in all, tracked layers, untracked parameters by kind
    (kind -> count), and the grouped convolutions kronfluence approximates."""
    layers = tracked_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no Linear or Conv2d layer that influence functions can track")
    tracked = {id(parameter) for module in layers for parameter in module.parameters()}
    untracked: Counter = Counter()
    total = 0
    for module in model.modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            total += parameter.numel()
            if id(parameter) not in tracked:
                untracked[_untracked_kind(module, parameter_name)] += parameter.numel()
    grouped = [module for module in layers if isinstance(module, nn.Conv2d) and module.groups > 1]
    return {
        "tracked_parameters": sum(parameter.numel() for module in layers for parameter in module.parameters()),
        "parameters": total,
        "tracked_layers": len(layers),
        "untracked_parameters": [[kind, count] for kind, count in untracked.most_common()],  # largest first
        "grouped_convolutions": len(grouped),
        "grouped_parameters": sum(parameter.numel() for module in grouped for parameter in module.parameters()),
    }


def tracking_line(arch: str, summary: Dict[str, Any]) -> str:
    """One line: `convnext_tiny: 28,566,184 of 28,589,128 parameters tracked (99.9%) in 59 Conv2d/Linear layers;
    not tracked: normalisation layers 0.057%, layer_scale 0.023%; approximated: 18 grouped/depthwise ...`."""
    total = max(summary["parameters"], 1)

    def share(count: int) -> str:
        return f"{100 * count / total:.2g}%"

    line = (
        f"{arch}: {summary['tracked_parameters']:,} of {summary['parameters']:,} parameters tracked "
        f"({100 * summary['tracked_parameters'] / total:.1f}%) in {summary['tracked_layers']} Conv2d/Linear layers"
    )
    if summary["untracked_parameters"]:
        line += "; not tracked: " + ", ".join(f"{kind} {share(count)}" for kind, count in summary["untracked_parameters"])
    if summary["grouped_convolutions"]:
        line += (
            f"; approximated: {summary['grouped_convolutions']} grouped/depthwise convolutions "
            f"({share(summary['grouped_parameters'])}; kronfluence averages their inputs over channel groups)"
        )
    return line
