"""The mathematics of the gradient index (gradient_index.py): LoGra-style compression of each tracked
layer's per-example gradient, and the query side that preconditions with kronfluence's own factors.

For a tracked layer (every Conv2d and Linear, as kronfluence tracks them) one example's gradient is
G = sum_t dY_t^T X_t (outputs x inputs): dY_t the gradient of the layer's output at position t, X_t the
layer's input there (a convolution's unfolded patch, plus a one for a bias). Two Gaussian matrices per
layer, P_in (inputs x k_in) and P_out (outputs x k_out) with independent N(0, 1/k) entries, compress it to
P_out^T G P_in = sum_t (dY_t P_out)^T (X_t P_in) (k_out x k_in), computed from a forward hook (the input
side, for a convolution as a convolution with P_in as its kernels, so that the patches are never
unfolded) and a backward hook (the output side), so G itself is never formed. A side whose size is at
most --index_dim is kept whole (the identity instead of a projection). Since E[P P^T] = I for each side
and the two sides are independent, <P_out^T A P_in, P_out^T B P_in> is an unbiased estimate of <A, B>
for any A, B; with A = H^-1 G_q, the query's measurement gradient preconditioned by kronfluence exactly as
analyze.py does it, the sum over layers estimates analyze.py's score g_q' H^-1 g_t (its variance:
`projected_score_variance`).

The default basis is not random: P_in and P_out are the top in_dim and out_dim eigenvectors of the layer's
fitted KFAC input and output-gradient covariances (LoGra's PCA initialisation), the very basis in which
EKFAC and KFAC precondition. Then P_out^T (H^-1 G_q) P_in is exactly the top-left block of the query's
preconditioned gradient in that basis (H^-1 is diagonal there), and the projected score is the exact
score's sum restricted to the index_dim x index_dim eigen-directions of largest covariance: no variance,
a bias of the directions left out. Measured on the trained digits it agrees with the exact EKFAC scores
far better than the Gaussian basis at the same size (docs/gradient_index.md)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.module.conv2d import extract_patches
from kronfluence.module.tracked_module import ModuleMode, TrackedModule
from kronfluence.module.utils import prepare_modules, set_factors, set_mode, update_factor_args, update_score_args
from kronfluence.utils.constants import LAMBDA_MATRIX_NAME, PRECONDITIONED_GRADIENT_NAME
from torch import nn
from torch.utils import data

from influence.analysis.scoring import layer_shape
from influence.model import tracking

# Bumped whenever the projections drawn for a (seed, layer) change, so that indexes built with other
# projections are refused rather than scored against queries projected differently.
PROJECTION_SCHEME = "gaussian-kronecker-v1"
EIGEN_SCHEME = "eigen-kronecker-v2"  # v2: sides kept whole are rotated too; what an eigenvector basis depends on is the factors' id
INPUT_SIDE, OUTPUT_SIDE = 0, 1


@dataclasses.dataclass(frozen=True)
class LayerProjection:
    """One tracked layer's place in the index: its gradient's shape (outputs x inputs, a bias counted as
    one more input, as scoring.layer_shape) and the compressed shape (out_dim x in_dim); a side kept
    whole has out_dim == outputs (or in_dim == inputs)."""

    name: str
    outputs: int
    inputs: int
    out_dim: int
    in_dim: int

    @property
    def size(self) -> int:
        return self.out_dim * self.in_dim

    @property
    def projects_outputs(self) -> bool:
        return self.out_dim < self.outputs

    @property
    def projects_inputs(self) -> bool:
        return self.in_dim < self.inputs


def tracked_named_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, layer) of every Conv2d and Linear in `model.named_modules()` order, the names kronfluence gives
    its TrackedModules; on a model kronfluence has already wrapped, the wrapped layers under their names."""
    wrapped = [(module.name, module.original_module) for module in model.modules() if isinstance(module, TrackedModule)]
    return wrapped or tracking.tracked_named_layers(model)


def layer_plan(model: nn.Module, index_dim: int) -> List[LayerProjection]:
    """Every tracked layer gets index_dim x index_dim, each side capped at the layer's own size (a side of at
    most index_dim is kept whole: its identity is exact and no larger)."""
    plan = []
    for name, module in tracked_named_layers(model):
        outputs, inputs = layer_shape(module)
        plan.append(LayerProjection(name, outputs, inputs, min(outputs, index_dim), min(inputs, index_dim)))
    return plan


def bytes_per_example(plan: Sequence[LayerProjection], itemsize: int) -> int:
    """Bytes one training image takes in the index: sum over layers of out_dim x in_dim x itemsize."""
    return sum(layer.size for layer in plan) * itemsize


def _side_seed(seed: int, position: int, side: int) -> int:
    """A full-width seed for one side of one layer: numpy's SeedSequence mixes (seed, layer, side), so that
    no two layers or seeds share a projection (torch.manual_seed of a combined integer could collide)."""
    words = np.random.SeedSequence([seed, position, side]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1  # 63 bits: a valid torch seed


def side_projection(size: int, dim: int, seed: int, position: int, side: int) -> Optional[torch.Tensor]:
    """A size x dim float32 matrix of independent N(0, 1/dim) entries drawn on the CPU from the side's own
    seed (the same on every machine), or None where the side is kept whole (dim == size)."""
    if dim >= size:
        return None
    generator = torch.Generator().manual_seed(_side_seed(seed, position, side))
    return torch.randn(size, dim, generator=generator, dtype=torch.float32) / math.sqrt(dim)


def top_eigenvectors(vectors: torch.Tensor, values: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The `dim` eigenvectors (columns) of largest eigenvalue, largest first, as a float32 size x dim
    matrix, and their positions in kronfluence's order. A side kept whole (dim == size) is still rotated
    into the eigenbasis: no inner product changes, and the stored gradients stay in the basis where
    EKFAC's curvature is diagonal (what the index's self-influence needs)."""
    order = torch.argsort(values.double(), descending=True, stable=True)[:dim]
    return vectors[:, order].float().contiguous(), order


@dataclasses.dataclass
class Projections:
    """The index's layers and their projections (None for a side kept whole), for one seed."""

    plan: List[LayerProjection]
    inputs: List[Optional[torch.Tensor]]
    outputs: List[Optional[torch.Tensor]]
    # For an eigenvector basis: each side's eigen-directions, as positions in kronfluence's eigenvalue
    # order (where its lambda matrix has them); None for Gaussian projections.
    input_orders: Optional[List[torch.Tensor]] = None
    output_orders: Optional[List[torch.Tensor]] = None

    @classmethod
    def draw(cls, plan: Sequence[LayerProjection], seed: int) -> "Projections":
        return cls(
            list(plan),
            [side_projection(layer.inputs, layer.in_dim, seed, position, INPUT_SIDE) for position, layer in enumerate(plan)],
            [side_projection(layer.outputs, layer.out_dim, seed, position, OUTPUT_SIDE) for position, layer in enumerate(plan)],
        )

    @classmethod
    def eigen(cls, plan: Sequence[LayerProjection], read: Callable[[str], Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> "Projections":
        """The top eigenvectors of each layer's fitted KFAC covariances: `read(name)` returns the layer's
        (input eigenvectors, input eigenvalues, output-gradient eigenvectors, output-gradient eigenvalues),
        eigenvectors as columns, as kronfluence stores them."""
        sides: List[List[Any]] = [[], [], [], []]
        for layer in plan:
            in_vectors, in_values, out_vectors, out_values = read(layer.name)
            if tuple(in_vectors.shape) != (layer.inputs, layer.inputs) or tuple(out_vectors.shape) != (layer.outputs, layer.outputs):
                raise ValueError(f"the factors' eigenvectors of {layer.name} are {tuple(out_vectors.shape)} and {tuple(in_vectors.shape)}, the layer {layer.outputs} x {layer.inputs}")
            for side, found in zip(sides, (*top_eigenvectors(in_vectors, in_values, layer.in_dim), *top_eigenvectors(out_vectors, out_values, layer.out_dim))):
                side.append(found)
        return cls(list(plan), sides[0], sides[2], sides[1], sides[3])

    def block_weights(self, inverse_curvature: Dict[str, torch.Tensor]) -> torch.Tensor:
        """For an eigenvector basis: kronfluence's 1 / (lambda + damping) of every stored entry (each
        layer's `inverse_curvature`, outputs x inputs in its eigenvalue order), flattened like `compress`'s
        output, so that sum(weights * b^2) is a training image's self-influence g' H^-1 g restricted to the
        index's eigen-directions."""
        if self.input_orders is None or self.output_orders is None:
            raise ValueError("only an eigenvector basis has per-entry curvature")
        parts = []
        for layer, in_order, out_order in zip(self.plan, self.input_orders, self.output_orders):
            weights = inverse_curvature[layer.name].reshape(layer.outputs, layer.inputs)
            parts.append(weights[out_order.to(weights.device)][:, in_order.to(weights.device)].reshape(-1))
        return torch.cat(parts).float()

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "Projections":
        move = lambda matrix: None if matrix is None else matrix.to(device=device, dtype=dtype)  # noqa: E731
        return Projections(self.plan, [move(m) for m in self.inputs], [move(m) for m in self.outputs], self.input_orders, self.output_orders)

    @property
    def dim(self) -> int:
        """Entries of one example's compressed gradient, all layers together."""
        return sum(layer.size for layer in self.plan)

    def compress(self, gradients: Sequence[torch.Tensor]) -> torch.Tensor:
        """Full per-layer gradients (batch x outputs x inputs each, in plan order) compressed and
        concatenated: batch x dim. The query side, and the tests' explicit reference."""
        parts = []
        for gradient, p_in, p_out in zip(gradients, self.inputs, self.outputs):
            if p_out is not None:
                gradient = torch.matmul(p_out.t().to(gradient.dtype), gradient)
            if p_in is not None:
                gradient = torch.matmul(gradient, p_in.to(gradient.dtype))
            parts.append(gradient.reshape(gradient.shape[0], -1))
        return torch.cat(parts, dim=1)


def project_layer_inputs(module: nn.Module, inputs: torch.Tensor, p_in: Optional[torch.Tensor]) -> torch.Tensor:
    """X_t P_in for every position t of every example: batch x positions x in_dim. For a convolution, the
    patches kronfluence unfolds (its `extract_patches`: channel groups averaged, zero padding) times P_in
    is a convolution of the input with P_in's columns as kernels, so only a side kept whole unfolds them."""
    bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        if p_in is None:
            patches = extract_patches(inputs, module.kernel_size, module.stride, module.padding, module.dilation, module.groups)
            if bias:
                patches = torch.cat([patches, patches.new_ones(patches.shape[:-1] + (1,))], dim=-1)
            return patches
        if module.groups > 1:
            inputs = inputs.reshape(inputs.shape[0], module.groups, -1, *inputs.shape[2:]).mean(dim=1)
        weights = module.weight[0].numel()
        kernels = p_in[:weights].t().reshape(p_in.shape[1], *module.weight.shape[1:]).to(inputs.dtype)
        # Zero padding whatever the layer's padding_mode, as kronfluence's unfold pads.
        projected = F.conv2d(inputs, kernels, stride=module.stride, padding=module.padding, dilation=module.dilation)
        projected = projected.flatten(2).transpose(1, 2)
        return projected + p_in[weights].to(inputs.dtype) if bias else projected
    flat = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    if p_in is None:
        return torch.cat([flat, flat.new_ones(flat.shape[:-1] + (1,))], dim=-1) if bias else flat
    projected = torch.matmul(flat, p_in[: flat.shape[-1]].to(flat.dtype))
    return projected + p_in[flat.shape[-1]].to(flat.dtype) if bias else projected


def flatten_output_gradient(module: nn.Module, gradient: torch.Tensor) -> torch.Tensor:
    """dY as batch x positions x outputs (a convolution's positions are its output pixels)."""
    if isinstance(module, nn.Conv2d):
        return gradient.flatten(2).transpose(1, 2)
    return gradient.reshape(gradient.shape[0], -1, gradient.shape[-1])


class CompressedGradientRecorder:
    """Hooks on every tracked layer of a plain (not kronfluence-wrapped) model that compress each
    example's gradient of whatever is backpropagated: after `loss.backward()`, `take()` returns
    batch x dim (float32, plan order). The loss must be a sum over examples (each example's output
    gradient is then its own), as the training loss is. Parameters need no gradient: a zero is added to
    the first layer's output, as kronfluence does, so that the backward pass reaches every layer and
    computes no weight gradients."""

    def __init__(self, model: nn.Module, projections: Projections) -> None:
        self.layers = dict(tracked_named_layers(model))
        self.projections = projections
        self.results: Dict[str, torch.Tensor] = {}
        self.handles: List[Any] = []
        self.zero: Optional[torch.Tensor] = None

    def __enter__(self) -> "CompressedGradientRecorder":
        missing = [layer.name for layer in self.projections.plan if layer.name not in self.layers]
        if missing:
            raise ValueError(f"the model has no layer {missing[0]} of the index")
        for layer, p_in, p_out in zip(self.projections.plan, self.projections.inputs, self.projections.outputs):
            self.handles.append(self.layers[layer.name].register_forward_hook(self._forward_hook(layer.name, p_in, p_out)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _forward_hook(self, name: str, p_in: Optional[torch.Tensor], p_out: Optional[torch.Tensor]):
        def hook(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> Optional[torch.Tensor]:
            with torch.no_grad():
                projected_inputs = project_layer_inputs(module, inputs[0].detach().float(), p_in)
            replaced = None
            if not output.requires_grad:
                if self.zero is None or self.zero.device != output.device:
                    self.zero = torch.zeros((), device=output.device, dtype=output.dtype, requires_grad=True)
                output = replaced = output + self.zero

            def backward(gradient: torch.Tensor) -> None:
                with torch.no_grad():
                    output_side = flatten_output_gradient(module, gradient.detach().float())
                    if p_out is not None:
                        output_side = torch.matmul(output_side, p_out)
                    self.results[name] = torch.einsum("bto,bti->boi", output_side, projected_inputs).reshape(output_side.shape[0], -1)

            output.register_hook(backward)
            return replaced

        return hook

    def take(self) -> torch.Tensor:
        missing = [layer.name for layer in self.projections.plan if layer.name not in self.results]
        if missing:
            raise RuntimeError(f"no gradient reached layer {missing[0]}: was backward() called on the summed loss?")
        compressed = torch.cat([self.results[layer.name] for layer in self.projections.plan], dim=1)
        self.results.clear()
        return compressed


def preconditioned_query_gradients(
    analyzer: Any,
    dataset: data.Dataset,
    batch_size: int,
    factor_args: FactorArguments,
    loaded_factors: Dict[str, Dict[str, torch.Tensor]],
    score_args: ScoreArguments,
    dataloader_kwargs: Dict[str, Any],
    inverse_curvature: Optional[Dict[str, torch.Tensor]] = None,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Each query batch's measurement gradient preconditioned per layer by kronfluence itself, exactly as
    analyze.py's full-rank scores use it (kronfluence's PRECONDITION_GRADIENT mode: its loaded factors, its
    damping rule applied by `prepare_modules`, its `precondition_gradient`), yielded one batch at a time
    as {layer name: batch x outputs x inputs}, so that only one batch of full gradients is held. For KFAC
    and EKFAC, `inverse_curvature` (when given) is filled with each layer's 1 / (lambda + damping) in its
    eigenbasis, as kronfluence prepared it (its damping rule, heuristic included)."""
    model, task, device = analyzer.model, analyzer.task, analyzer.state.device
    # Under torchrun kronfluence wraps the model in DDP; each rank here runs its own query batches, which
    # must not wait on the other ranks' forward passes (DDP's buffer broadcast), so the module runs bare.
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    names = [module.name for module in model.modules() if isinstance(module, TrackedModule)]
    update_factor_args(model=model, factor_args=factor_args)
    update_score_args(model=model, score_args=score_args)
    set_mode(model=model, mode=ModuleMode.PRECONDITION_GRADIENT, tracked_module_names=names, release_memory=True)
    for factor_name, factors in loaded_factors.items():
        set_factors(model=model, factor_name=factor_name, factors=factors, clone=True)
    prepare_modules(model=model, tracked_module_names=names, device=device)
    modules = [module for module in model.modules() if isinstance(module, TrackedModule)]
    if inverse_curvature is not None:
        for module in modules:
            inverse_curvature[module.name] = module.storage[LAMBDA_MATRIX_NAME].clone()
    try:
        for images, labels, indices in data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **dataloader_kwargs):
            batch = (images.to(device), labels.to(device), indices.to(device))
            model.zero_grad(set_to_none=True)
            task.compute_measurement(batch=batch, model=model).backward()
            gradients = {}
            for module in modules:
                gradients[module.name] = module.storage[PRECONDITIONED_GRADIENT_NAME]
                module.storage[PRECONDITIONED_GRADIENT_NAME] = None
            yield gradients
    finally:
        model.zero_grad(set_to_none=True)
        set_mode(model=model, mode=ModuleMode.DEFAULT, tracked_module_names=names, release_memory=True)


def projected_score_variance(
    query_gradient: torch.Tensor, train_gradient: torch.Tensor, layer: LayerProjection
) -> torch.Tensor:
    """The variance of one layer's projected score <P_out^T A P_in, P_out^T B P_in> over the draw of the
    two Gaussian projections (A the preconditioned query gradient, B the training gradient, outputs x
    inputs; leading batch dimensions broadcast), exactly, from Gaussian and Wishart fourth moments: with
    Y = A^T B, s = tr(Y), a = 1/k_in and b = 1/k_out (0 for a side kept whole),

        Var = a (|Y|^2 + tr(Y^2)) + b (tr(A^T A B^T B) + tr(Y^2)) + a b (|Y|^2 + |A|^2 |B|^2 + tr(A^T A B^T B) + s^2)

    (|.| Frobenius norms). With one side whole it is the familiar Johnson-Lindenstrauss variance of a
    Gaussian quadratic form, (|Y|^2 + tr(Y^2)) / k. Layers are projected independently, so the variance
    of the summed score is the sum over layers."""
    a = 1.0 / layer.in_dim if layer.projects_inputs else 0.0
    b = 1.0 / layer.out_dim if layer.projects_outputs else 0.0
    A, B = query_gradient.double(), train_gradient.double()
    Y = A.transpose(-1, -2) @ B
    score = Y.diagonal(dim1=-2, dim2=-1).sum(-1)
    y_norm = Y.square().sum((-2, -1))
    y_square_trace = (Y * Y.transpose(-1, -2)).sum((-2, -1))
    gram_trace = ((A.transpose(-1, -2) @ A) * (B.transpose(-1, -2) @ B)).sum((-2, -1))
    norms = A.square().sum((-2, -1)) * B.square().sum((-2, -1))
    return a * (y_norm + y_square_trace) + b * (gram_trace + y_square_trace) + a * b * (y_norm + norms + gram_trace + score**2)
