"""The noise prior over Wan's latent frames (noise_prior.latent_noise_prior), against eq. 4 on video frames."""

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from magicme.noise_prior import frame_covariance, latent_frame_covariance, latent_frame_groups, latent_noise_prior, noise_prior


def test_groups_follow_the_causal_vae():
    groups = latent_frame_groups(5)
    assert [list(g) for g in groups] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    assert groups[-1].stop == 17  # 1 + 4k video frames ↔ k + 1 latent frames


@pytest.mark.parametrize("gamma", [0.15, 0.5, 0.9])
def test_latent_covariance_is_that_of_group_averaged_eq4_noise(gamma):
    # reference: draw eq. 4 noise over 17 video frames with the AnimateDiff prior, average each VAE group,
    # normalise to unit variance; its empirical correlation must be R
    x = noise_prior((64, 4, 17, 16, 16), gamma, generator=torch.Generator().manual_seed(0))
    y = torch.stack([x[:, :, g.start : g.stop].mean(2) for g in latent_frame_groups(5)], 2)
    flat = y.permute(2, 0, 1, 3, 4).reshape(5, -1).double()
    flat = flat / flat.std(dim=1, keepdim=True)
    emp = flat @ flat.T / flat.shape[1]
    assert torch.allclose(emp, latent_frame_covariance(5, gamma), atol=0.02), emp


@pytest.mark.parametrize("gamma", [0.15, 0.5, 0.9])
def test_samples_have_the_latent_covariance(gamma):
    x = latent_noise_prior((64, 16, 6, 8, 8), gamma, generator=torch.Generator().manual_seed(1))
    flat = x.permute(2, 0, 1, 3, 4).reshape(6, -1).double()  # 65,536 samples per latent-frame pair
    emp = flat @ flat.T / flat.shape[1]
    assert torch.allclose(emp, latent_frame_covariance(6, gamma), atol=0.02), emp  # s.e. ≈ 0.004


def test_latent_covariance_is_a_valid_correlation_and_not_ar1():
    for gamma in (0.0, 0.15, 0.6, 0.99):
        r = latent_frame_covariance(21, gamma)  # 81 frames
        assert torch.allclose(r, r.T) and torch.allclose(r.diagonal(), torch.ones(21, dtype=torch.float64))
        assert torch.linalg.eigvalsh(r).min() > 0  # positive definite: a Cholesky factor exists
    r = latent_frame_covariance(6, 0.15).tolist()
    assert r[2][3] == pytest.approx(0.0415, abs=1e-4)  # the docstring's number
    assert r[2][4] == pytest.approx(0.15**4 * r[2][3], rel=1e-9)  # κ (γ⁴)^d between 4-frame groups ...
    assert r[2][4] != pytest.approx(r[2][3] ** 2, rel=0.1)  # ... which is not AR(1)
    assert r[0][1] != pytest.approx(r[1][2], rel=0.1)  # the one-frame first group differs
    assert torch.equal(latent_frame_covariance(4, 0.0), torch.eye(4, dtype=torch.float64))
    # one frame per group (a VAE without temporal compression) is eq. 4 itself
    assert torch.allclose(latent_frame_covariance(7, 0.3, temporal_scale=1), frame_covariance(7, 0.3))


def test_gamma_zero_is_stock_prepare_latents_draw():
    shape = (1, 16, 5, 8, 8)
    ours = latent_noise_prior(shape, 0.0, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    stock = randn_tensor(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    assert torch.equal(ours, stock)


def test_deterministic_and_checked():
    a = latent_noise_prior((1, 16, 3, 4, 4), 0.3, generator=torch.Generator().manual_seed(2), dtype=torch.bfloat16)
    b = latent_noise_prior((1, 16, 3, 4, 4), 0.3, generator=torch.Generator().manual_seed(2), dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    with pytest.raises(ValueError, match="gamma"):
        latent_noise_prior((1, 16, 3, 4, 4), 1.0)
    with pytest.raises(ValueError, match="shape"):
        latent_noise_prior((16, 3, 4, 4), 0.1)
