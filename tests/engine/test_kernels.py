"""The fused CPU kernels against the PyTorch expressions they replace."""

import pytest
import torch
import torch.nn.functional as F

from lmserve.engine.kernels import load_kernels, use_native_kernels
from lmserve.engine.models.layers import RMSNorm, RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def kernels():
    return load_kernels()


def tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def norm_pair(size, dtype, kernels):
    torch.manual_seed(0)
    plain = RMSNorm(size, 1e-5)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
    plain = plain.to(dtype)
    native = RMSNorm(size, 1e-5).to(dtype)
    native.load_state_dict(plain.state_dict())
    use_native_kernels(native, kernels)
    return plain, native


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(kernels, dtype):
    plain, native = norm_pair(96, dtype, kernels)
    x = torch.randn(37, 96).to(dtype) * 3
    torch.testing.assert_close(native(x), plain(x), **tolerance(dtype))
    heads = torch.randn(5, 4, 96).to(dtype)  # leading dims, as Qwen3's per-head norms use it
    torch.testing.assert_close(native(heads), plain(heads), **tolerance(dtype))
    strided = torch.randn(7, 200).to(dtype)[:, 10:106]  # rows of a wider tensor
    torch.testing.assert_close(native(strided), plain(strided), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_norm_updates_the_residual_stream(kernels, dtype):
    plain, native = norm_pair(64, dtype, kernels)
    x, residual = torch.randn(19, 64).to(dtype), torch.randn(19, 64).to(dtype)
    expected_out, expected_residual = plain.add_norm(x.clone(), residual.clone())
    out, new_residual = native.add_norm(x.clone(), residual.clone())
    torch.testing.assert_close(new_residual, expected_residual, **tolerance(dtype))
    torch.testing.assert_close(out, expected_out, **tolerance(dtype))
    torch.testing.assert_close(expected_residual, residual + x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(kernels, dtype):
    x = (torch.randn(23, 2 * 50) * 8).to(dtype)  # wide range: exp must not overflow or lose accuracy
    x[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])
    expected = F.silu(x[:, :50]) * x[:, 50:]
    torch.testing.assert_close(kernels.silu_and_mul(x), expected, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotary_in_place_matches_the_copying_path(kernels, dtype, partial):
    head_dim, max_positions = 32, 64
    config = {"rope_theta": 10000.0, "partial_rotary_factor": partial}
    plain = RotaryEmbedding(head_dim, max_positions, config)
    native = RotaryEmbedding(head_dim, max_positions, config)
    use_native_kernels(native, kernels)
    positions = torch.tensor([0, 5, 63, 17, 17, 2])
    qkv = torch.randn(6, (4 + 2 + 2) * head_dim).to(dtype)  # q, k, v of a fused projection
    q, k = qkv[:, : 4 * head_dim], qkv[:, 4 * head_dim : 6 * head_dim]
    expected_q, expected_k = plain(positions, q.clone(), k.clone(), head_dim)
    out_q, out_k = native(positions, q, k, head_dim)
    torch.testing.assert_close(out_q, expected_q, **tolerance(dtype))
    torch.testing.assert_close(out_k, expected_k, **tolerance(dtype))
    assert out_q.data_ptr() == qkv.data_ptr()  # rotated in place, no copy


def test_rotary_rejects_positions_past_the_table(kernels):
    rotary = RotaryEmbedding(16, 8, {})
    use_native_kernels(rotary, kernels)
    with pytest.raises(RuntimeError, match="position out of range"):
        rotary(torch.tensor([8]), torch.randn(1, 16), torch.randn(1, 16), 16)
