"""Float64 equivalence on whole torchvision networks, both modes, several band counts, odd sizes; at sizes
where the planner bands, and each test asserts that even the convolutions reading the most rows ran on bands
(with train-mode BatchNorm, whose statistics need a convolution's whole output, that some convolution did)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import assert_equivalent
from torch import nn

from lightning_lrcnn.convert import plan_for
from lightning_lrcnn.estimate import estimate, estimate_plain
from lightning_lrcnn.plan import describe


def _small_head(make):  # type: ignore[no-untyped-def]
    """VGG's 120M-parameter classifier makes parameter gradients the peak (bands cannot lower it: the model
    then runs plain); a one-layer head keeps the avgpool-flatten-linear path."""
    def build() -> nn.Module:
        model = make()
        model.classifier = nn.Linear(512 * 7 * 7, 10)
        return model

    return build


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("rows", [2, 3, 7])
def test_vgg16_features(mode: str, rows: int) -> None:
    assert_equivalent(lambda: torchvision.models.vgg16().features, (1, 3, 99, 45), mode=mode, rows=rows,
                      tallest=True)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval_bn", "train_bn"])
def test_vgg11_bn_classifier(mode: str, train: bool) -> None:
    assert_equivalent(_small_head(torchvision.models.vgg11_bn), (1, 3, 83, 65), mode=mode, rows=3, train=train,
                      tallest=not train)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval_bn", "train_bn"])
def test_vgg11_bn_classifier_seven_bands(mode: str, train: bool) -> None:
    assert_equivalent(_small_head(torchvision.models.vgg11_bn), (1, 3, 83, 65), mode=mode, rows=7, train=train,
                      tallest=not train)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval_bn", "train_bn"])
@pytest.mark.parametrize("rows", [2, 7])
def test_resnet18_classifier(mode: str, train: bool, rows: int) -> None:
    shape = (1, 3, 193, 161) if train else (2, 3, 97, 71)  # train-mode BN bands from larger sizes
    assert_equivalent(torchvision.models.resnet18, shape, mode=mode, rows=rows, train=train, tallest=not train)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval_bn", "train_bn"])
def test_resnet50_classifier(mode: str, train: bool) -> None:
    assert_equivalent(torchvision.models.resnet50, (1, 3, 97, 81), mode=mode, rows=3, train=train, tallest=not train)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
def test_resnet18_frozen_batchnorm(mode: str) -> None:
    assert_equivalent(torchvision.models.resnet18, (2, 3, 96, 80), mode=mode, rows=4, train=True, batchnorm="freeze",
                      tallest=True)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
def test_detection_backbone_with_frozen_batchnorm_and_fpn(mode: str) -> None:
    """torchvision's detection backbones: ``FrozenBatchNorm2d`` computes its scale and shift from buffers in
    forward (tensors without image rows: they run once, whole, and no longer end a region at every norm; the
    network used to run plain), the first layers frozen, and an FPN returning a dict of five maps."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    def make() -> nn.Module:
        return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)

    converted = assert_equivalent(make, (1, 3, 256, 128), mode=mode, rows=4, train=True, tallest=True)
    plan = plan_for(converted, torch.randn(1, 3, 256, 128, dtype=torch.float64))
    assert not plan.plain_reason and estimate(plan).peak_bytes < estimate_plain(plan), describe(plan)


@pytest.mark.parametrize(
    "make",
    [torchvision.models.mobilenet_v3_small, torchvision.models.efficientnet_b0, torchvision.models.densenet121,
     torchvision.models.regnet_y_400mf, torchvision.models.shufflenet_v2_x0_5, torchvision.models.googlenet],
    ids=lambda f: f.__name__,
)
def test_more_torchvision_classifiers(make: object) -> None:
    kwargs = {"aux_logits": False, "init_weights": False} if make is torchvision.models.googlenet else {}
    assert_equivalent(lambda: make(**kwargs), (1, 3, 160, 144), mode="2ps", rows=3, train=False, tallest=True)


@pytest.mark.parametrize("mode", [pytest.param("2ps", marks=pytest.mark.slow), "overl"])
def test_convnext_channels_last_blocks(mode: str) -> None:
    """Permute to channels-last, LayerNorm, Linear, GELU, layer scale, permute back: all in the bands (its 28M
    parameters' gradients set the peak below this size, where it runs plain)."""
    assert_equivalent(torchvision.models.convnext_tiny, (1, 3, 256, 224), mode=mode, rows=4, tallest=True)


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize(
    "make", [torchvision.models.mobilenet_v3_small, torchvision.models.efficientnet_b0, torchvision.models.densenet121,
             torchvision.models.convnext_tiny, torchvision.models.resnext50_32x4d, torchvision.models.regnet_y_800mf,
             torchvision.models.mobilenet_v3_large],
    ids=lambda f: f.__name__)
def test_more_torchvision_classifiers_both_modes(make: object, mode: str, train: bool) -> None:
    # train-mode BatchNorm cuts regions into short segments: more rows and a larger image before they band
    shape, rows = ((1, 3, 256, 224), 16) if train else ((1, 3, 192, 160), 4)
    assert_equivalent(make, shape, mode=mode, rows=rows, train=train, tallest=not train)


def test_regnet_squeeze_excitation_blocks_stream_and_merge() -> None:
    """RegNetY with frozen BatchNorm: each block's squeeze-excitation mean is streamed, no segment of one
    activation is left beside the block it ends (its input would be materialised for nothing), outputs and
    gradients match, and the measured peak is the estimate's (within 10%)."""
    import copy

    import torch

    from lightning_lrcnn.convert import plan_for
    from lightning_lrcnn.estimate import estimate
    from lightning_lrcnn.memory import measure
    from lightning_lrcnn.plan import Segment, Streamed, describe

    shape = (1, 3, 640, 640)  # where streaming the means lowers the peak (below, parameter gradients set it)
    converted = assert_equivalent(torchvision.models.regnet_y_400mf, shape, mode="overl", rows=8, train=True,
                                  batchnorm="freeze", tallest=True)
    plan = plan_for(converted, torch.randn(shape, dtype=torch.float64))
    assert sum(isinstance(s, Streamed) for s in plan.steps) >= 4, describe(plan)
    for before, step in zip(plan.steps, plan.steps[1:], strict=False):
        if isinstance(step, Segment) and step.recompute and len(step.nodes) == 1 and isinstance(before, Segment):
            assert before.mode != step.mode or not set(step.nodes[0].all_input_nodes) & set(before.nodes), \
                describe(plan)
    model = copy.deepcopy(converted).float()
    x = torch.randn(shape)
    model(x)
    measured = measure(lambda: model(x).square().mean().backward()).peak_bytes
    assert abs(estimate(plan_for(model, x)).peak_bytes / measured - 1) < 0.10


@pytest.mark.parametrize("mode", ["2ps", "overl"])
def test_torchvision_segmentation_model_with_dict_outputs(mode: str) -> None:
    """A whole torchvision segmentation model (DeepLabV3, MobileNetV3 backbone with dilated convolutions, ASPP's
    global pooling branch, an auxiliary head, bilinear upsampling to the input size) returns a dict: both
    outputs and every gradient match the plain model, and its stem convolution ran on bands."""
    import copy

    import torch
    from conftest import ConvHeights

    from lightning_lrcnn import to_row_centric

    torch.manual_seed(0)
    plain = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, aux_loss=True).double().eval()
    converted = to_row_centric(copy.deepcopy(plain), mode=mode, rows=4)
    x = torch.randn(1, 3, 256, 256, dtype=torch.float64)
    outs, grads, heights = [], [], []
    for model in (plain, converted):
        xi = x.clone().requires_grad_()
        with ConvHeights(model) as seen:
            out = model(xi)
            (out["out"].square().mean() + out["aux"].sin().sum()).backward()
        outs.append(out)
        grads.append([xi.grad, *(p.grad for p in model.parameters())])
        heights.append(seen.conv)
    assert set(outs[1]) == {"out", "aux"}
    outs[1]["extra"] = outs[1]["out"]  # a plain dict, as the plain model's: callers may add to it (fx's is immutable)
    for key in ("out", "aux"):
        torch.testing.assert_close(outs[1][key], outs[0][key])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want)
    assert max(heights[1].values()) < 256, heights[1]


@pytest.mark.parametrize("mode", ["2ps", "overl"])
def test_inception_v3_asymmetric_kernels(mode: str) -> None:
    """1×7 and 7×1 convolutions (rows and columns padded differently), 'valid' stride-2 reductions, four-branch
    concatenations. Random initial weights without trained BatchNorm statistics let activations grow to about
    1e12: float64 sums then differ by about 1e-14 of a tensor's largest value, and by up to 2e-7 in a few
    cancelling elements, hence ``rtol=1e-6``."""
    import torch

    def make() -> nn.Module:
        torch.manual_seed(0)
        return torchvision.models.inception_v3(aux_logits=False, init_weights=True)

    assert_equivalent(make, (1, 3, 320, 320), mode=mode, rows=4, tallest=True, rtol=1e-6, atol=1e-7)
