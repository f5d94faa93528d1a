import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from magicme.noise_prior import correlate_frames, frame_covariance, noise_prior


@pytest.mark.parametrize("gamma", [0.0, 0.15, 0.5, 0.9])
def test_empirical_frame_covariance_matches_eq4(gamma):
    g = torch.Generator().manual_seed(1)
    x = noise_prior((64, 4, 8, 16, 16), gamma, generator=g)  # 65,536 samples per frame pair
    flat = x.permute(2, 0, 1, 3, 4).reshape(8, -1).double()
    emp = flat @ flat.T / flat.shape[1]
    # standard error of a sample covariance of unit-variance normals is about 1/sqrt(n) ≈ 0.004
    assert torch.allclose(emp, frame_covariance(8, gamma), atol=0.02), emp
    assert torch.allclose(flat.var(dim=1), torch.ones(8, dtype=torch.float64), atol=0.02)


def test_gamma_zero_is_stock_randn_tensor():
    shape = (2, 4, 16, 8, 8)
    ours = noise_prior(shape, 0.0, generator=torch.Generator().manual_seed(7))
    stock = randn_tensor(shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, stock)


def test_list_of_generators_and_dtype():
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = noise_prior((2, 4, 5, 4, 4), 0.3, generator=gens, dtype=torch.float16)
    assert x.dtype == torch.float16 and x.shape == (2, 4, 5, 4, 4)
    single = noise_prior((1, 4, 5, 4, 4), 0.3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x[1:].float(), single, atol=1e-2)


def test_same_seed_same_noise_and_first_frame_untouched():
    a = noise_prior((1, 4, 6, 4, 4), 0.15, generator=torch.Generator().manual_seed(3))
    b = noise_prior((1, 4, 6, 4, 4), 0.15, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    eps = randn_tensor((1, 4, 6, 4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[:, :, 0], eps[:, :, 0])
    assert torch.allclose(correlate_frames(eps, 0.15), a)


@pytest.mark.parametrize("gamma", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_bad_gamma_raises(gamma):
    with pytest.raises(ValueError, match="gamma"):
        noise_prior((1, 4, 2, 4, 4), gamma)


def test_bad_shape_raises():
    with pytest.raises(ValueError, match="shape"):
        noise_prior((4, 2, 4, 4), 0.1)
