"""quant outside MobileNetV2's shape: functional activations are understood, and every pattern whose
quantization would be silently wrong raises a ValueError naming the node."""
import importlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import quant

ACTIVATION_FORMS = {
    "module": lambda x: nn.functional.relu(x),  # replaced below by an nn.ReLU module
    "F.relu": lambda x: F.relu(x),
    "torch.relu": lambda x: torch.relu(x),
    "method": lambda x: x.relu(),
    "clamp": lambda x: torch.clamp(x, min=0),
    "clamp_min": lambda x: x.clamp_min(0),
}
RELU6_FORMS = {"F.relu6": lambda x: F.relu6(x), "clamp06": lambda x: torch.clamp(x, 0, 6),
               "hardtanh": lambda x: F.hardtanh(x, 0.0, 6.0)}


class ConvChain(nn.Module):
    """conv -> BN -> activation -> conv -> BN -> activation -> conv, the activation given as a callable."""

    def __init__(self, activation, channels: int, hidden: int, seed: int, module_activation: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden)
        self.conv2, self.bn2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.BatchNorm2d(hidden)
        self.conv3, self.bn3 = nn.Conv2d(hidden, 2, 1), nn.BatchNorm2d(2)  # BN: a data-free output range
        self.activation = activation
        self.act_module = module_activation
        for bn in (self.bn1, self.bn2, self.bn3):  # BN statistics as after training, so the folding is not trivial
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 2.0)
            bn.bias.data.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, x):
        act = self.act_module if self.act_module is not None else self.activation
        x = act(self.bn1(self.conv1(x)))
        x = act(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


def _relative(a, b):
    return (a - b).norm().item() / max(b.norm().item(), 1e-12)


@settings(max_examples=12, deadline=None)
@given(form=st.sampled_from(sorted(ACTIVATION_FORMS)), channels=st.integers(1, 4), hidden=st.integers(2, 8),
       seed=st.integers(0, 2**16))
def test_functional_relu_forms_quantize_like_the_module(form, channels, hidden, seed):
    # Every spelling of ReLU becomes the same canonical graph: the same pairs are equalized and the simulated
    # INT8 outputs agree with those of the nn.ReLU network to float rounding (1e-5 relative: the two
    # pipelines do the same float operations, so only summation order inside torch could differ).
    reference = ConvChain(None, channels, hidden, seed, module_activation=nn.ReLU())
    functional = ConvChain(ACTIVATION_FORMS[form], channels, hidden, seed)
    functional.load_state_dict(reference.state_dict())
    x = torch.randn(2, channels, 9, 9, generator=torch.Generator().manual_seed(seed))
    folded = quant.replace_relu6(quant.fold_batchnorm(functional))
    assert len(quant.graph.conv_pairs(folded)) == 2
    with torch.no_grad():
        expected = quant.dfq(reference, mode="simulated")(x)
        actual = quant.dfq(functional, mode="simulated")(x)
    assert _relative(actual, expected) < 1e-5


@pytest.mark.parametrize("form", sorted(RELU6_FORMS))
def test_functional_relu6_forms_are_replaced(form):
    model = ConvChain(RELU6_FORMS[form], 3, 4, 0)
    replaced = quant.replace_relu6(quant.fold_batchnorm(model))
    assert not any(isinstance(m, nn.ReLU6) for m in replaced.modules())
    assert len(quant.graph.conv_pairs(replaced)) == 2


def test_clamp_with_other_bounds_is_not_taken_for_relu():
    model = ConvChain(lambda x: torch.clamp(x, min=-1.0), 3, 4, 0)
    folded = quant.fold_batchnorm(model)
    assert quant.graph.conv_pairs(folded) == []
    # equalize says it leaves the chains through the clamp alone; the clamp then feeds conv2 with a range BN
    # statistics do not give
    with pytest.warns(UserWarning, match=r"left unequalized.*conv1 -> clamp"), pytest.raises(ValueError, match="clamp"):
        quant.dfq(model, mode="simulated")


def test_silu_feeding_a_conv_needs_calibration():
    model = ConvChain(None, 3, 4, 0, module_activation=nn.SiLU())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"act_module \(SiLU\).*calibration"):
            quant.dfq(model, mode="simulated")
    assert any("left unequalized" in str(w.message) and "SiLU" in str(w.message) for w in caught)
    x = torch.randn(8, 3, 9, 9)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrated = quant.dfq(model, mode="simulated", calibration=[x])
        # 8-bit with measured ranges on the calibration batch itself: a few percent at most
        assert _relative(calibrated(x), model(x)) < 0.1


class LinearInTheMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.linear = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(9, 9)
        self.conv2, self.bn2 = nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.eval()

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.linear(x.flatten(2)).unflatten(2, (3, 3))  # mixes pixels: no BN model of its output
        return self.bn2(self.conv2(x))


def test_a_linear_in_the_middle_needs_calibration():
    model = LinearInTheMiddle()
    with pytest.raises(ValueError, match=r"conv2 reads .*unflatten.*calibration"):
        quant.dfq(model, mode="int8")
    x = torch.randn(4, 3, 3, 3)
    int8 = quant.dfq(model, mode="int8", calibration=[x], backend="qnnpack")
    with torch.no_grad():
        assert _relative(int8(x), model(x)) < 0.1


class Halve(nn.Module):
    def forward(self, x):
        return x * 0.5


class MaskedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.mask, self.conv, self.bn = Halve(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.eval()

    def forward(self, x):
        return self.bn(self.conv(self.mask(x)))


def test_registered_range_keeping_module_passes_the_input_range():
    # Halve is traced through (x * 0.5 is not a module call): the conv reads a mul, which has no data-free
    # range; registering Halve as a range-keeping leaf makes the input range pass through it.
    with pytest.raises(ValueError, match="mul"):
        quant.dfq(MaskedInput(), mode="simulated")
    quant.register_module(Halve, keeps_range=True)
    try:
        simulated = quant.dfq(MaskedInput(), mode="simulated", input_range=(-1.0, 1.0))
        assert any(node.op == "call_module" and node.target == "mask" for node in simulated.graph.nodes)
    finally:
        quant.registry._RULES.pop(Halve)
    with pytest.raises(ValueError, match="module_type"):
        quant.register_module(int, keeps_range=True)


def test_the_group_is_passed_as_group():
    # the pre-release keyword fields= is gone: one name, group, for what the network was built with
    model = ConvChain(None, 3, 4, 0, module_activation=nn.ReLU())
    with pytest.raises(TypeError, match="fields"):
        quant.dfq(model, fields=1, mode="simulated")


def test_submodules_are_not_shadowed():
    for name in ("graph", "transforms", "plan", "int8", "arithmetic", "registry", "pipeline"):
        module = importlib.import_module(f"quant.{name}")
        assert getattr(quant, name) is module, name
    assert callable(quant.dfq) and callable(quant.quantize)
    assert quant.transforms.fold_batchnorm is quant.fold_batchnorm
