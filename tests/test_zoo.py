"""Float64 equivalence on timm and segmentation_models_pytorch networks at sizes where the planner bands
(slow; skipped unless installed: ``pip install -e '.[zoo]'`` then ``pytest -m slow tests/test_zoo.py``)."""

from __future__ import annotations

import pytest
from conftest import assert_equivalent

# networks no issue names: shape-checked forwards, "same" padding, dropped branches, depthwise and grouped convs
TIMM = ["resnet18", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
        "regnetx_002", "cspresnet50", "res2net50_14w_8s", "resnest14d", "ghostnet_100", "dla34", "hrnet_w18_small",
        "vgg11", "rexnet_100", "mixnet_s", "dpn68", "nf_resnet26", "resnetv2_50", "repvgg_a0", "fastvit_t8",
        "edgenext_xx_small",
        # the backbones of the savings table (scripts/backbones.py), and families that ran no band before
        "resnet50", "efficientnetv2_rw_t", "mobilenetv3_large_100", "regnety_008", "convnext_tiny",
        "vovnet39a", "mambaout_femto",
        # found exact in a wider sweep, and banded down to the stem at this size (squeeze-excitation, ECA and
        # global-context attention, lambda layers, ConvNeXt-V2's GRN)
        "inception_v3", "xception41", "resnet50d", "seresnext26d_32x4d", "ecaresnet26t", "gcresnet33ts",
        "lambda_resnet26t", "convnextv2_atto", "hgnet_tiny", "starnet_s1", "ghostnetv2_100", "cs3darknet_s"]
# real architectures run where the planner bands: even the convolutions reading the most rows run on bands
SIZE = (1, 3, 224, 192)
SMP = ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "Linknet", "PSPNet", "MAnet", "UPerNet", "Segformer"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("name", TIMM)
def test_timm(name: str, mode: str) -> None:
    timm = pytest.importorskip("timm")
    assert_equivalent(lambda: timm.create_model(name, pretrained=False), SIZE, mode=mode, rows=4, tallest=True)


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mode", ["2ps", "overl"])
@pytest.mark.parametrize("arch", SMP)
def test_segmentation_models_pytorch(arch: str, mode: str, train: bool) -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    assert_equivalent(lambda: getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=2),
                      (2, 3, 192, 192) if train else (1, 3, 288, 288), mode=mode, rows=4, train=train,
                      # U-Net++'s peak is in its nested decoder: the planner keeps the encoder stem whole there;
                      # MA-Net's is in its parameter gradients (164 MiB in float64): the planner keeps its last,
                      # full-resolution decoder block whole (bands would cost time and save nothing)
                      tallest=not train and arch not in ("UnetPlusPlus", "MAnet"))
    # train: batch 2 (BatchNorm on pooled 1x1 maps needs more than one value)


@pytest.mark.slow
def test_smp_transformer_encoder() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    assert_equivalent(lambda: smp.Unet(encoder_name="mit_b0", encoder_weights=None, classes=2), (1, 3, 192, 192),
                      mode="overl", rows=4)



@pytest.mark.slow
@pytest.mark.parametrize("batchnorm", ["exact", "freeze"])
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_atto", "mobilenetv3_small_100"])
def test_timm_training_with_stochastic_depth_and_dropout(name: str, batchnorm: str) -> None:
    """Train mode: stochastic depth writes its mask in place; BatchNormAct2d is traced through."""
    timm = pytest.importorskip("timm")
    assert_equivalent(lambda: timm.create_model(name, pretrained=False, drop_path_rate=0.2, drop_rate=0.1),
                      (2, 3, 192, 160), mode="overl", rows=4, train=True, batchnorm=batchnorm,
                      tallest=batchnorm == "freeze")
