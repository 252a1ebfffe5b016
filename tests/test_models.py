"""Float64 equivalence on whole torchvision networks, both modes, several band counts, odd sizes."""

from __future__ import annotations

import pytest
import torchvision
from conftest import assert_equivalent


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
def test_vgg16_features(mode: str, rows: int) -> None:
    assert_equivalent(lambda: torchvision.models.vgg16().features, (2, 3, 67, 45), mode=mode, rows=rows)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval_bn", "train_bn"])
def test_vgg11_bn_classifier(mode: str, train: bool) -> None:
    assert_equivalent(torchvision.models.vgg11_bn, (1, 3, 35, 33), mode=mode, rows=3, train=train)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval_bn", "train_bn"])
def test_vgg11_bn_classifier_seven_bands(mode: str, train: bool) -> None:
    assert_equivalent(torchvision.models.vgg11_bn, (1, 3, 35, 33), mode=mode, rows=7, train=train)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval_bn", "train_bn"])
@pytest.mark.parametrize("rows", [2, 7])
def test_resnet18_classifier(mode: str, train: bool, rows: int) -> None:
    assert_equivalent(torchvision.models.resnet18, (2, 3, 61, 47), mode=mode, rows=rows, train=train)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval_bn", "train_bn"])
def test_resnet50_classifier(mode: str, train: bool) -> None:
    assert_equivalent(torchvision.models.resnet50, (1, 3, 65, 49), mode=mode, rows=3, train=train)


@pytest.mark.parametrize("mode", ["2ps", "overl"])
def test_resnet18_frozen_batchnorm(mode: str) -> None:
    assert_equivalent(torchvision.models.resnet18, (2, 3, 64, 48), mode=mode, rows=4, train=True, batchnorm="freeze")


@pytest.mark.parametrize(
    "make",
    [torchvision.models.mobilenet_v3_small, torchvision.models.efficientnet_b0, torchvision.models.densenet121,
     torchvision.models.regnet_y_400mf, torchvision.models.shufflenet_v2_x0_5, torchvision.models.googlenet],
    ids=lambda f: f.__name__,
)
def test_more_torchvision_classifiers(make: object) -> None:
    kwargs = {"aux_logits": False, "init_weights": False} if make is torchvision.models.googlenet else {}
    assert_equivalent(lambda: make(**kwargs), (1, 3, 64, 56), mode="2ps", rows=3, train=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize(
    "make", [torchvision.models.mobilenet_v3_small, torchvision.models.efficientnet_b0, torchvision.models.densenet121,
             torchvision.models.convnext_tiny, torchvision.models.resnext50_32x4d], ids=lambda f: f.__name__)
def test_more_torchvision_classifiers_both_modes(make: object, mode: str) -> None:
    assert_equivalent(make, (1, 3, 96, 80), mode=mode, rows=4, train=False)
