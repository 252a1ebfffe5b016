"""Row rules: every supported op, alone and in small graphs, matches the plain module in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import NormAct, assert_equivalent
from torch import nn

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.convert import plan_for
from lightning_lrcnn.plan import Segment

pytestmark = pytest.mark.usefixtures("banded_anyway")  # rules and geometry at small sizes: see conftest

MODES = ("2ps", "overl")


def _stack(*layers: nn.Module) -> callable:
    return lambda: copy.deepcopy(nn.Sequential(*layers))  # fresh parameters for every model built


CONVS = {
    "k3s1p1": dict(kernel_size=3, padding=1),
    "k3s2p1": dict(kernel_size=3, stride=2, padding=1),
    "k7s2p3": dict(kernel_size=7, stride=2, padding=3),
    "k1s1p0": dict(kernel_size=1),
    "k1s2p0": dict(kernel_size=1, stride=2),
    "k3d2p2": dict(kernel_size=3, padding=2, dilation=2),
    "k3p0": dict(kernel_size=3, padding=0),
    "k4s2p1": dict(kernel_size=4, stride=2, padding=1),
    "asym_k31": dict(kernel_size=(3, 1), padding=(1, 0)),
    "asym_k15_s21": dict(kernel_size=(1, 5), stride=(2, 1), padding=(0, 2)),
    "asym_pad": dict(kernel_size=3, padding=(2, 0)),
    "same_odd": dict(kernel_size=3, padding="same"),
    "same_even": dict(kernel_size=4, padding="same"),
    "same_dil": dict(kernel_size=3, padding="same", dilation=3),
    "valid": dict(kernel_size=3, padding="valid"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "replicate": dict(kernel_size=5, padding=2, padding_mode="replicate"),
    "groups": dict(kernel_size=3, padding=1, groups=2),
    "depthwise": dict(kernel_size=3, padding=1, groups=4, stride=2),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv2d(name: str, mode: str) -> None:
    kw = CONVS[name]
    make = _stack(nn.Conv2d(4, 4, **kw), nn.ReLU(inplace=True), nn.Conv2d(4, 4, **kw))
    assert_equivalent(make, (2, 4, 23, 17), mode=mode, rows=3)


POOLS = {
    "max_k2s2": nn.MaxPool2d(2),
    "max_k3s2p1": nn.MaxPool2d(3, 2, 1),
    "max_ceil": nn.MaxPool2d(3, 2, ceil_mode=True),
    "max_ceil_pad": nn.MaxPool2d(3, 2, 1, ceil_mode=True),
    "max_dil": nn.MaxPool2d(3, 1, 1, dilation=2),
    "max_asym": nn.MaxPool2d((3, 2), (2, 1), (1, 0)),
    "avg_k2s2": nn.AvgPool2d(2),
    "avg_k3s2p1": nn.AvgPool2d(3, 2, 1),
    "avg_no_pad_count": nn.AvgPool2d(3, 2, 1, count_include_pad=False),
    "avg_ceil": nn.AvgPool2d(3, 2, 1, ceil_mode=True),
    "avg_ceil_nocount": nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    "avg_divisor": nn.AvgPool2d(3, 1, 1, divisor_override=5),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(POOLS))
def test_pooling(name: str, mode: str) -> None:
    make = _stack(nn.Conv2d(3, 4, 3, padding=1), POOLS[name], nn.Conv2d(4, 2, 3, padding=1))
    assert_equivalent(make, (2, 3, 25, 19), mode=mode, rows=3)


TRANSPOSED = {
    "k4s2p1": dict(kernel_size=4, stride=2, padding=1),
    "k3s2p1op1": dict(kernel_size=3, stride=2, padding=1, output_padding=1),
    "k2s2": dict(kernel_size=2, stride=2),
    "k1s2": dict(kernel_size=1, stride=2),
    "k3s1p1": dict(kernel_size=3, padding=1),
    "k3s2d2": dict(kernel_size=3, stride=2, dilation=2, padding=2),
    "groups": dict(kernel_size=4, stride=2, padding=1, groups=2),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(TRANSPOSED))
def test_conv_transpose(name: str, mode: str) -> None:
    make = _stack(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, **TRANSPOSED[name]),
                  nn.Conv2d(4, 2, 3, padding=1))
    assert_equivalent(make, (2, 3, 11, 9), mode=mode, rows=4)


RESIZES = {
    "nearest_x2": nn.Upsample(scale_factor=2),
    "nearest_size": nn.Upsample(size=(29, 13)),
    "nearest_x1.5": nn.Upsample(scale_factor=1.5),
    "nearest_exact": nn.Upsample(scale_factor=1.7, mode="nearest-exact"),
    "bilinear_x2": nn.Upsample(scale_factor=2, mode="bilinear"),
    "bilinear_align": nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    "bilinear_size": nn.Upsample(size=(31, 20), mode="bilinear"),
    "bilinear_down": nn.Upsample(size=(7, 5), mode="bilinear", align_corners=True),
    "nearest2d": nn.UpsamplingNearest2d(scale_factor=2),
    "bilinear2d": nn.UpsamplingBilinear2d(scale_factor=3),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(RESIZES))
def test_resize(name: str, mode: str) -> None:
    make = _stack(nn.Conv2d(3, 4, 3, padding=1), RESIZES[name], nn.Conv2d(4, 2, 3, padding=1))
    assert_equivalent(make, (2, 3, 13, 11), mode=mode, rows=3)


ACTIVATIONS = {
    "relu_inplace": lambda: nn.ReLU(inplace=True), "relu6": lambda: nn.ReLU6(inplace=True),
    "leaky": lambda: nn.LeakyReLU(0.2, inplace=True), "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"),
    "silu": lambda: nn.SiLU(inplace=True), "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "hardswish": lambda: nn.Hardswish(inplace=True), "hardsigmoid": nn.Hardsigmoid, "elu": nn.ELU, "mish": nn.Mish,
    "prelu": lambda: nn.PReLU(4), "softplus": nn.Softplus, "identity": nn.Identity,
    "dropout_eval": lambda: nn.Dropout(0.5), "dropout2d_eval": lambda: nn.Dropout2d(0.3),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_pointwise_modules(act: str, mode: str) -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), ACTIVATIONS[act](),
                             nn.Conv2d(4, 2, 3, padding=1))

    converted = assert_equivalent(make, (2, 3, 15, 12), mode=mode, rows=4)
    assert len(plan_for(converted, torch.randn(2, 3, 15, 12, dtype=torch.float64)).segments) >= 1


class Functional(nn.Module):
    """Functional forms, elementwise ops with tensors and scalars, cat on channels, shape-derived sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.2)
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.wt = nn.Parameter(torch.randn(6, 4, 4, 4) * 0.2)
        self.bn = nn.BatchNorm2d(6)
        self.scale = nn.Parameter(torch.randn(1, 6, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w1, self.b1, stride=1, padding=1)
        y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False)
        y = F.relu(y, inplace=True)
        z = F.max_pool2d(y, 3, 2, 1)
        z = F.leaky_relu(z, 0.1) * 2.0 + 1.0
        z = F.avg_pool2d(z, 3, 1, 1, count_include_pad=False)
        up = F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=False)
        y = torch.cat([y, up * self.scale], dim=1)
        y = y[:, :6] - torch.sigmoid(y[:, 6:])
        y = F.conv_transpose2d(y, self.wt, None, stride=2, padding=1)
        y = torch.tanh(y).relu() + y.mul(0.5)
        y = F.pad(y, (1, 1, 2, 0))
        return F.dropout(y, 0.5, training=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
def test_functional_forms(mode: str, rows: int) -> None:
    converted = assert_equivalent(Functional, (2, 3, 21, 14), mode=mode, rows=rows)
    plan = plan_for(converted, torch.randn(2, 3, 21, 14, dtype=torch.float64))
    assert len(plan.segments) >= 1
    global_ops = [s for s in plan.steps if not hasattr(s, "bands") and s.op != "output"]
    assert not global_ops, f"expected every op to be row-local, global: {global_ops}"


class SqueezeExcite(nn.Module):
    """A global op (adaptive pooling) in the middle of a row-local network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * s + x)


class TinyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.dec2 = nn.Conv2d(16, 8, 3, padding=1)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear")
        self.dec1 = nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        m = self.mid(e2)
        d2 = F.relu(self.dec2(torch.cat([self.up2(m), e2], 1)))
        return self.dec1(torch.cat([self.up1(d2), e1], 1))


class PaddedUNet(nn.Module):
    """The common U-Net decoder step: upsample, pad to the skip's size (amounts computed from shapes), concat."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.dec = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        u = self.up(self.down(e))
        dy, dx = e.size()[2] - u.size()[2], e.size()[3] - u.size()[3]
        u = F.pad(u, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.dec(torch.cat([e, u], dim=1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [SqueezeExcite, TinyUNet], ids=lambda c: c.__name__)
def test_graphs_with_branches(make: type, mode: str) -> None:
    assert_equivalent(make, (2, 3, 32, 20), mode=mode, rows=5)


class DropsAResult(nn.Module):
    """Computes a branch and drops it (as timm's DLA does with an unused projection): it must still run."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.unused = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        self.unused(x)
        return self.b(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_dropped_result_still_runs(mode: str, train: bool) -> None:
    """A value nothing reads is computed like in the plain model (train BN updates its statistics; the
    buffers are compared) and freed where it is made."""
    converted = assert_equivalent(DropsAResult, (2, 3, 16, 12), mode=mode, rows=4, train=train)
    plan = plan_for(converted, torch.randn(2, 3, 16, 12, dtype=torch.float64))
    made = {v.name: i for i, s in enumerate(plan.steps) for v in (s.outputs if hasattr(s, "outputs") else [s])}
    freed = {v.name: i for i, fs in enumerate(plan.free_after) for v in fs}
    dropped = [v.name for v in plan.graph.nodes if not v.users and v.op != "output"]
    assert dropped and all(freed.get(v) == made[v] for v in dropped)


@pytest.mark.parametrize("mode", MODES)
def test_padding_computed_from_shapes_runs_band_by_band(mode: str) -> None:
    converted = assert_equivalent(PaddedUNet, (1, 3, 37, 29), mode=mode, rows=4)
    plan = plan_for(converted, torch.randn(1, 3, 37, 29, dtype=torch.float64))
    assert any(n.target is F.pad for s in plan.segments if len(s.bands) > 1 for n in s.nodes)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [2, 3, 5, 8, 11])
@pytest.mark.parametrize("net", ["pads", "convs"])
def test_rows_made_of_padding_only(net: str, mode: str, rows: int) -> None:
    """Output rows whose window lies wholly in the padding (pad top > 1, conv padding > kernel // 2) read no
    input rows: a band may compute them with none of its input's rows at hand."""
    make = _stack(nn.AvgPool2d(3, stride=2, padding=1), nn.ZeroPad2d((1, 0, 2, 1)), nn.ZeroPad2d((1, 0, 2, 1)),
                  nn.GELU()) if net == "pads" else _stack(
        nn.AvgPool2d(2), nn.AvgPool2d(2), nn.ZeroPad2d((1, 0, 2, 1)), nn.ZeroPad2d((1, 0, 2, 1)),
        nn.Conv2d(3, 4, (1, 3), padding=(3, 1)), nn.SiLU(), nn.Conv2d(4, 4, 3, padding=2, padding_mode="replicate"))
    assert_equivalent(make, (1, 3, 41, 29) if net == "pads" else (1, 3, 18, 7), mode=mode, rows=rows, train=True)


@pytest.mark.parametrize("mode", MODES)
def test_train_mode_dropout_stays_exact(mode: str) -> None:  # element-wise: global (channel dropout: test_noise)
    make = _stack(nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(0.5), nn.Conv2d(4, 2, 3, padding=1))
    assert_equivalent(make, (2, 3, 16, 16), mode=mode, rows=4, train=True)


def test_circular_padding_is_global_not_wrong() -> None:
    make = _stack(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.Conv2d(4, 2, 3, padding=1))
    converted = assert_equivalent(make, (1, 3, 12, 12), mode="2ps", rows=3)
    plan = plan_for(converted, torch.randn(1, 3, 12, 12, dtype=torch.float64))
    assert [n.name for s in plan.segments for n in s.nodes] == ["_1"]


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_policies(mode: str) -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))

    assert_equivalent(make, (2, 3, 17, 9), mode=mode, rows=3, train=True, batchnorm="exact")
    assert_equivalent(make, (2, 3, 17, 9), mode=mode, rows=3, train=True, batchnorm="freeze")
    with pytest.warns(UserWarning, match="per_band"):
        model = to_row_centric(make().double(), mode=mode, rows=3, batchnorm="per_band")
    before = model[1].running_mean.clone()
    model(torch.randn(2, 3, 17, 9, dtype=torch.float64)).sum().backward()
    assert not torch.equal(before, model[1].running_mean)  # per-band statistics still move the running stats


# --------------------------------------------------------------------------------------------- norm+act, channels-last


def _norm_act_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), NormAct(6), nn.Conv2d(6, 6, 3, padding=1), NormAct(6),
                         nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", ["eval", "freeze", "exact"])
def test_functional_batchnorm_is_row_local_wherever_called(policy: str, mode: str) -> None:
    """Eval mode and ``freeze``: the whole stack runs in bands (the assert and the functional call cut
    nothing); ``exact`` in train mode splits it like nn.BatchNorm2d. Buffers match the plain model's."""
    train = policy != "eval"
    converted = assert_equivalent(_norm_act_net, (2, 3, 24, 17), mode=mode, rows=3, train=train,
                                  batchnorm="exact" if policy == "eval" else policy)
    plan = plan_for(converted, torch.randn(2, 3, 24, 17, dtype=torch.float64))
    if policy != "exact":  # no global step but the output
        assert [s.op for s in plan.steps if not isinstance(s, Segment)] == ["output"]
        assert len(plan.segments[0].bands) > 1


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, permute to channels-last, LayerNorm, Linear, GELU, Linear, layer scale, permute back, a
    residual; then a LayerNorm2d (permute, F.layer_norm, permute) as in ConvNeXt's downsampling."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c))
        self.ln2d = nn.Parameter(torch.rand(c))
        self.down = nn.Conv2d(c, c, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.ln2d).permute(0, 3, 1, 2)
        return self.down(x.contiguous())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [2, 5])
def test_channels_last_blocks_run_in_bands(mode: str, rows: int) -> None:
    converted = assert_equivalent(ConvNeXtBlock, (2, 3, 26, 19), mode=mode, rows=rows, train=True)
    plan = plan_for(converted, torch.randn(2, 3, 26, 19, dtype=torch.float64))
    banded = {n.name for s in plan.segments if len(s.bands) > 1 for n in s.nodes}
    assert {"norm", "fc1", "gelu", "fc2", "layer_norm"} <= banded, banded


def test_norms_over_the_rows_stay_global_and_exact() -> None:
    """LayerNorm over (H, W), a LayerNorm whose last axes hold the rows, and a mean over H are global."""

    class OverRows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.ln = nn.LayerNorm([24, 17])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.ln(self.conv1(x))  # normalises over H and W
            z = F.layer_norm(y.permute(0, 3, 1, 2), (4, 24))  # rows in the last two axes
            return self.conv2(z.permute(0, 2, 3, 1) - y.mean(2, keepdim=True))

    converted = assert_equivalent(OverRows, (2, 3, 24, 17), mode="2ps", rows=3, train=True)
    plan = plan_for(converted, torch.randn(2, 3, 24, 17, dtype=torch.float64))
    banded = {n.name for s in plan.segments for n in s.nodes}
    assert {"ln", "layer_norm", "mean"}.isdisjoint(banded), banded
