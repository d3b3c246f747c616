"""`--arch`: any torchvision classifier. For resnet18, convnext_tiny, efficientnet_b0, mobilenet_v3_small and
vit_b_16 (random weights, 32-pixel crops): analyze.py's identity scores equal an independent float64 autograd
computation over the tracked parameters (grouped convolutions as kronfluence approximates them); EKFAC scores,
the gradient index and preflight's sizes on mobilenet_v3_small; which parameters are tracked, stated; and the
one-line refusals (an unknown name, another architecture's weights or checkpoint, a changed architecture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import tiny_counts, write_image_folder
from safetensors import safe_open
from test_preflight import PHASE_FILES, _payload
from torch import nn

import analyze
import gradient_index
import pipeline
import top_influences
from influence.analysis.settings import AnalysisSettings
from influence.model import architectures, attention, checkpoints, tracking
from influence.results import naming, preflight
from influence.runtime.cli import UserError

SIZE = 32  # crop and resize: every architecture's five halvings leave one pixel; ViT-B/16 sees 2 x 2 patches
ARCHS = ("resnet18", "convnext_tiny", "efficientnet_b0", "mobilenet_v3_small", "vit_b_16", "swin_t")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 classes, 3 training and 2 validation images each."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "imagenet", tiny_counts())


def _random_checkpoint(arch: str, path: Path) -> Path:
    """A random model whose every tracked layer matters: BatchNorm statistics of noise images (a random
    init's would blow up), ConvNeXt's layer scales at 0.5 (initialised at 1e-6) and ViT's head drawn (zero
    at init, which would leave every other gradient zero)."""
    torch.manual_seed(0)
    model = architectures.build(arch, image_size=SIZE)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layer_scale"):
                parameter.fill_(0.5)
        if arch.startswith("vit_"):
            nn.init.normal_(model.heads.head.weight, std=0.05)
    model = pipeline.calibrate_batchnorm(model, torch.randn(16, 3, SIZE, SIZE))
    torch.save(model.state_dict(), path)
    return path


def _argv(arch: str, dataset: Path, checkpoint: Path, output_dir: Path, *extra: str):
    return ["--arch", arch, "--dataset_dir", str(dataset), "--checkpoint", str(checkpoint), "--resize_size", str(SIZE),
            "--crop_size", str(SIZE), "--num_workers", "0", "--output_dir", str(output_dir), "--query_batch_size", "2",
            "--train_batch_size", "3", "--num_queries", "2", *extra]


def _scores(path: Path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(naming.SCORES_KEY)


def _tracked_gradient(model: nn.Module, value_of) -> torch.Tensor:
    """The gradient of `value_of(model)` over the tracked layers, each as kronfluence lays it out (outputs x
    inputs, the bias as one more input): autograd's for every layer but a grouped convolution, whose
    gradient kronfluence approximates with its input averaged over the channel groups (dY^T times the
    unfolded averaged patches), computed here from the layer's input and output gradient."""
    layers = tracking.tracked_layers(model)
    grouped = [layer for layer in layers if isinstance(layer, nn.Conv2d) and layer.groups > 1]
    inputs, output_grads = {}, {}

    def hook(layer, args, output):
        inputs[layer] = args[0]
        output.register_hook(lambda gradient: output_grads.__setitem__(layer, gradient))

    handles = [layer.register_forward_hook(hook) for layer in grouped]
    try:
        parameters = [parameter for layer in layers for parameter in layer.parameters()]
        grads = dict(zip(map(id, parameters), torch.autograd.grad(value_of(model), parameters)))
    finally:
        for handle in handles:
            handle.remove()
    pieces = []
    for layer in layers:
        if layer in inputs:
            averaged = inputs[layer].reshape(1, layer.groups, -1, *inputs[layer].shape[2:]).mean(dim=1)
            patches = F.unfold(averaged, layer.kernel_size, layer.dilation, layer.padding, layer.stride)[0]
            output_grad = output_grads[layer].flatten(2)[0]
            weight, bias = output_grad @ patches.T, output_grad.sum(dim=-1) if layer.bias is not None else None
        else:
            weight, bias = grads[id(layer.weight)].flatten(1), grads[id(layer.bias)] if layer.bias is not None else None
        pieces.append(weight if bias is None else torch.cat([weight, bias[:, None]], dim=1))
    return torch.cat([piece.reshape(-1) for piece in pieces])


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_scores_equal_float64_autograd_over_the_tracked_parameters(arch, dataset, tmp_path, capsys):
    checkpoint = _random_checkpoint(arch, tmp_path / f"{arch}.pt")
    path = analyze.main(_argv(arch, dataset, checkpoint, tmp_path / "out", "--factor_strategy", "identity"))["identity"]
    assert path == naming.pairwise_scores_path(tmp_path / "out", f"imagenet_{arch}", "identity")
    scores = _scores(path)
    assert scores.shape == (2, 6)
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith(f"INFO {arch}: "))
    record = json.loads((path.parent / naming.RUN_CONFIG_FILE).read_text())
    assert record["depends_on"]["model"].startswith(f"arch:{arch} checkpoint sha256:") and record["resolved"]["arch"] == arch
    assert f"INFO {tracking.tracking_line(arch, record['resolved']['tracking'])}" == line

    model = pipeline.build_model(weights=None, checkpoint=checkpoint, arch=arch, image_size=SIZE).double()
    preprocessing = pipeline.Preprocessing(SIZE, SIZE, architectures.preset_sizes(architectures.first_weights(arch))[2])
    train = pipeline.get_imagenet_dataset("train", dataset, preprocessing=preprocessing)
    val = pipeline.get_imagenet_dataset("val", dataset, preprocessing=preprocessing)

    def margin(image, label):
        def value(model):
            logits = model(image[None].double())[0]
            return -(logits[label] - torch.cat([logits[:label], logits[label + 1 :]]).logsumexp(0))
        return value

    def loss(image, label):
        return lambda model: F.cross_entropy(model(image[None].double()), torch.tensor([label]), reduction="sum")

    queries = torch.stack([_tracked_gradient(model, margin(*val[i][:2])) for i in range(2)])
    expected = torch.stack([queries @ _tracked_gradient(model, loss(*train[i][:2])) for i in range(len(train))], dim=1)
    assert expected.abs().max() > 0
    torch.testing.assert_close(scores.double(), expected, rtol=3e-3, atol=1e-5 * expected.abs().max().item())


def test_ekfac_gradient_index_and_preflight_on_mobilenet_v3_small(dataset, tmp_path, capsys):
    """EKFAC end to end on a model with depthwise convolutions and squeeze-excitation layers: the files equal
    preflight's count, and a gradient index wide enough to keep every layer whole gives the same scores."""
    arch, output_dir = "mobilenet_v3_small", tmp_path / "out"
    checkpoint = _random_checkpoint(arch, tmp_path / f"{arch}.pt")
    common = _argv(arch, dataset, checkpoint, output_dir, "--damping_factor", "heuristic")
    exact = _scores(analyze.main([*common, "--factor_strategy", "ekfac"])["ekfac"])
    assert exact.shape == (2, 6) and torch.isfinite(exact).all()

    settings = AnalysisSettings(strategy="ekfac", output_dir=str(output_dir), analysis_name=f"imagenet_{arch}")
    model = pipeline.build_model(weights=None, checkpoint=checkpoint, arch=arch, image_size=SIZE)
    counted = preflight.factor_bytes(model, settings)
    factors = naming.factors_dir(output_dir, f"imagenet_{arch}", "ekfac")
    for phase, names in PHASE_FILES.items():
        assert counted[phase] == sum(_payload(factors / f"{name}.safetensors") for name in names), phase

    whole = max(max(shape) for shape in preflight.tracked_layer_shapes(model))
    index_flags = ["--arch", arch, "--dataset_dir", str(dataset), "--checkpoint", str(checkpoint), "--resize_size", str(SIZE),
                   "--crop_size", str(SIZE), "--num_workers", "0", "--output_dir", str(output_dir), "--index_dim", str(whole)]
    gradient_index.main(["build", *index_flags, "--dtype", "float32", "--train_batch_size", "3"])
    path = gradient_index.main(["query", *index_flags, "--num_queries", "2", "--damping_factor", "heuristic"])
    assert path.parent.parent.name == f"imagenet_{arch}"
    torch.testing.assert_close(_scores(path), exact, rtol=1e-3, atol=1e-4 * exact.abs().max().item())
    capsys.readouterr()
    with pytest.raises(SystemExit):  # another architecture against these factors: named from their record
        gradient_index.main(["query", "--arch", "resnet18", "--weights", "none", "--analysis_name", f"imagenet_{arch}",
                             "--dataset_dir", str(dataset), "--resize_size", str(SIZE), "--crop_size", str(SIZE), "--num_workers", "0",
                             "--output_dir", str(output_dir), "--index_dim", str(whole), "--num_queries", "2"])
    assert f"were computed for --arch {arch}, not --arch resnet18: pass --arch {arch}" in capsys.readouterr().err


def test_tracking_is_stated_and_attention_is_tracked():
    """Every parameter of ViT-B/16 but its normalisation layers, class token and position embedding is
    tracked once its attention is rebuilt (a third of them are attention projections), with the same outputs."""
    torch.manual_seed(0)
    vit = architectures.build("vit_b_16", image_size=SIZE)
    nn.init.normal_(vit.heads.head.weight, std=0.05)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = vit.eval()(images)
        summary_before = tracking.describe_tracking(vit)
        after = attention.make_attention_trackable(vit)(images)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    summary = tracking.describe_tracking(vit)
    assert summary["parameters"] == summary_before["parameters"] == 86_420_200
    assert summary_before["tracked_parameters"] < 0.7 * summary["parameters"]  # attention's projections were out of reach
    assert [kind for kind, _ in summary["untracked_parameters"]] == ["normalisation layers", "pos_embedding", "class_token"]
    assert summary_before["untracked_parameters"][0] == ["attention projections (applied functionally)", 28_348_416]
    assert summary["tracked_layers"] == 50 and summary["grouped_convolutions"] == 0
    convnext = tracking.describe_tracking(architectures.build("convnext_tiny"))
    assert convnext["grouped_convolutions"] == 18 and [kind for kind, _ in convnext["untracked_parameters"]] == ["normalisation layers", "layer_scale"]
    line = tracking.tracking_line("convnext_tiny", convnext)
    assert line.startswith("convnext_tiny: 28,566,184 of 28,589,128 parameters tracked (99.9%) in 59 Conv2d/Linear layers")
    assert "approximated: 18 grouped/depthwise convolutions" in line
    # A GoogLeNet saved with its auxiliary classifiers (as torchvision builds it for training) loads without them.
    with torch.device("meta"):
        state = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()
    assert any(key.startswith("aux1.") for key in state)
    loaded = checkpoints.model_from_state_dict({key: torch.ones(value.shape) for key, value in state.items()}, "x", "googlenet")
    assert loaded.aux1 is None and loaded.fc.weight.eq(1).all()
    with pytest.raises(UserError, match="no Linear or Conv2d layer"):
        tracking.describe_tracking(nn.Sequential(nn.Flatten(), nn.LayerNorm(3)))


@pytest.mark.parametrize("arch, size", [("swin_t", SIZE), ("swin_v2_t", SIZE), ("maxvit_t", 224), ("googlenet", SIZE),
                                        ("inception_v3", 75), ("squeezenet1_1", SIZE), ("vit_b_16", SIZE)])
def test_every_tracked_layer_runs_as_a_layer_and_every_layer_that_runs_is_tracked(arch, size):
    """Forward hooks on every Linear and Conv2d: the ones that run are exactly the tracked ones (a layer
    whose weights are applied functionally would get no factors), with the outputs torchvision's model gives."""
    original = pipeline.random_model(arch, seed=0, image_size=size).eval()
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = original(images)
    model = attention.make_attention_trackable(original)
    ran = set()
    layers = [module for module in model.modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    handles = [layer.register_forward_hook(lambda layer, *_: ran.add(layer)) for layer in layers]
    with torch.no_grad():
        output = model(images)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    tracked = tracking.tracked_layers(model)
    assert {id(layer) for layer in ran} == {id(layer) for layer in tracked}
    summary = tracking.describe_tracking(model)
    assert summary["tracked_parameters"] == sum(p.numel() for layer in tracked for p in layer.parameters())
    assert summary["tracked_parameters"] > 0.99 * summary["parameters"]


def test_defaults_stay_resnet50_and_other_weights_have_their_own_preset():
    args = analyze.parse_args(["--dataset_dir", "x"])
    assert (args.arch, args.analysis_name) == ("resnet50", "imagenet")
    assert analyze.parse_args(["--demo", "--arch", "vit_b_16"]).analysis_name == "demo_vit_b_16"
    assert pipeline.model_preprocessing(None) == pipeline.Preprocessing(256, 224, "bilinear")
    assert pipeline.model_preprocessing("IMAGENET1K_V1", arch="efficientnet_b0") == pipeline.Preprocessing(256, 224, "bicubic")
    assert pipeline.model_preprocessing(None, arch="convnext_tiny") == pipeline.Preprocessing(236, 224, "bilinear")
    assert pipeline.default_weights("vit_h_14") == "IMAGENET1K_SWAG_E2E_V1"
    # torchvision's zero head on a random-init ViT would leave every other gradient zero: drawn instead.
    vit = pipeline.build_model(weights=pipeline.NO_WEIGHTS, arch="vit_b_16", image_size=SIZE)
    assert vit.heads.head.weight.abs().min() > 0 and isinstance(vit.encoder.layers[0].self_attention, attention.SelfAttention)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet51"], "unknown --arch 'resnet51'; torchvision's classification models are alexnet, convnext_base,"),
    (["--arch", "resnet18", "--weights", "IMAGENET1K_V2"], "--weights IMAGENET1K_V2: ResNet18_Weights has IMAGENET1K_V1, none"),
    (["--arch", "resnet18", "--weights", "ResNet50_Weights.IMAGENET1K_V2"], "are resnet50's, not resnet18's"),
])
def test_a_wrong_name_or_another_architectures_weights_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        analyze.parse_args(["--dataset_dir", "x", *argv])
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error


def test_another_architectures_checkpoint_or_a_changed_arch_is_refused(dataset, tmp_path, capsys):
    checkpoint = _random_checkpoint("resnet18", tmp_path / "resnet18.pt")
    output_dir = tmp_path / "out"
    common = [*_argv("resnet18", dataset, checkpoint, output_dir, "--factor_strategy", "identity"), "--analysis_name", "mine"]
    analyze.main(common)
    random = ["--dataset_dir", str(dataset), "--weights", "none", "--resize_size", str(SIZE), "--crop_size", str(SIZE),
              "--num_workers", "0", "--output_dir", str(output_dir), "--num_queries", "2", "--factor_strategy", "identity",
              "--analysis_name", "random"]
    analyze.main([*random, "--arch", "resnet18"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:  # the same folder and flags, only --arch changed: refused
        analyze.main([*random, "--arch", "resnet34"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "computed with other settings (model 'arch:resnet18 weights:none' -> 'arch:resnet34 weights:none')" in err
    with pytest.raises(SystemExit):  # a crop a vision transformer cannot cut into 16-pixel patches
        analyze.main([*random, "--arch", "vit_b_16", "--crop_size", "40", "--resize_size", "40", "--analysis_name", "vit"])
    err = capsys.readouterr().err.strip()
    assert err.endswith("vit_b_16 cannot be built for 40-pixel crops (--crop_size): Input shape indivisible by patch size!")
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        analyze.main([*common, "--arch", "mobilenet_v3_small"])  # a resnet18 file read as a MobileNet
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a mobilenet_v3_small state dict: it has no 2-d `classifier.3.weight`" in err

    # top_influences.py rebuilds the recorded architecture from the record (the checkpoint at its recorded
    # path) for its predictions, and refuses another --arch.
    shown = ["--dataset_dir", str(dataset), "--output_dir", str(output_dir), "--analysis_name", "mine",
             "--factor_strategy", "identity", "--figure_dir", str(tmp_path / "figures"), "--num_figures", "1"]
    result = top_influences.main(shown)  # resnet18 read from the record: a ResNet-50 could not load this checkpoint
    assert len(result["queries"]) == 2 and result["queries"][0]["prediction"] and len(result["figures"]) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        top_influences.main([*shown, "--arch", "resnet34"])
    assert "were computed for --arch resnet18, not --arch resnet34: pass --arch resnet18" in capsys.readouterr().err
