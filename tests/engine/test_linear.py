import pytest
import torch
from torch import nn

from lmserve.engine.linear import PackedLinear, choose_linear_backend, onednn_available, pack_linears

needs_onednn = pytest.mark.skipif(not onednn_available(torch.device("cpu"), torch.float32), reason="no oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias)
    packed = PackedLinear(linear)
    for shape in [(1, 64), (7, 64), (2, 5, 64)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        assert packed(x).shape == (*shape[:-1], 96)


@needs_onednn
def test_pack_linears_replaces_every_linear():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)))
    x = torch.randn(3, 8)
    expected = model(x)
    assert pack_linears(model) == 3
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_choose_linear_backend():
    cpu = torch.device("cpu")
    assert choose_linear_backend("torch", cpu, torch.float32) == "torch"
    assert choose_linear_backend("auto", cpu, torch.float16) == "torch"
    with pytest.raises(ValueError, match="onednn"):
        choose_linear_backend("onednn", cpu, torch.float16)
    if onednn_available(cpu, torch.float32):
        assert choose_linear_backend("auto", cpu, torch.float32) == "onednn"
