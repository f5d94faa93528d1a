"""3D Gaussian noise prior (paper §4.1).

Initial latents for f frames are drawn from N(0, Σ_f(γ)) with Σ_f(γ)[m, n] = γ^|m−n| (eq. 4),
independently at every (batch, channel, y, x) position. That covariance is exactly the one of a
stationary AR(1) process, so it is sampled in O(f) with no matrix factorisation:

    x_0 = ε_0,    x_n = γ·x_{n−1} + sqrt(1 − γ²)·ε_n,    ε ~ N(0, I)

Var(x_n) = γ²·1 + (1 − γ²) = 1 and Cov(x_m, x_n) = γ^|m−n|.

Wan latents (`latent_noise_prior`). Wan's causal video VAE maps F = 1 + 4k video frames to k + 1 latent
frames: latent frame 0 encodes video frame 0 alone, latent frame j ≥ 1 the group G_j = {4j − 3, …, 4j}.
γ keeps its meaning per video frame: let x ~ N(0, Σ_F(γ)) be eq. 4 noise over the video frames and let
each latent frame summarise its group evenly, y_j = mean_{n ∈ G_j} x_n. Then

    C_ij = Cov(y_i, y_j) = 1 / (|G_i| |G_j|) · Σ_{m ∈ G_i} Σ_{n ∈ G_j} γ^|m−n|,

and the latent prior is N(0, R) with the correlation matrix R_ij = C_ij / sqrt(C_ii C_jj) (every latent
frame stays N(0, 1), as the denoiser expects). R = D A Σ_F(γ) Aᵀ D, with A the (k+1) × F averaging matrix of
disjoint non-empty groups (full row rank), Σ_F(γ) positive definite for γ < 1 and D diagonal positive, so R
is positive definite. R is not an AR(1) matrix: for groups i, j ≥ 1 at distance d = j − i ≥ 1 every
n − m = 4d + b − a is positive, so C_ij = γ^{4d} S(γ) S(1/γ) / 16 with S(x) = 1 + x + x² + x³, i.e.
R_ij = κ (γ⁴)^d with κ = S(γ) S(1/γ) / (16 C_jj) ≠ 1 for 0 < γ < 1 (γ = 0.15: R at d = 1 is 0.0415, at
d = 2 it is γ⁴ · 0.0415, not 0.0415²), and the first group has one frame, not four. So it is sampled exactly
as y = L ε, ε ~ N(0, I), with L the Cholesky factor of the small (k+1) × (k+1) matrix R (21 rows for 81
frames). γ = 0 gives R = I: the i.i.d. draw itself, bit for bit the stock `WanPipeline.prepare_latents`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor


def check_gamma(gamma: float) -> float:
    """Return γ as a float, or raise ValueError if it is outside [0, 1)."""
    try:
        gamma = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a number in [0, 1), got {gamma!r}") from None
    if not (0.0 <= gamma < 1.0) or math.isnan(gamma):
        raise ValueError(f"gamma must be in [0, 1) (paper §4.1; 0.15 is the paper's default), got {gamma}")
    return gamma


def correlate_frames(eps: torch.Tensor, gamma: float, frame_dim: int = 2) -> torch.Tensor:
    """Turn i.i.d. N(0, 1) noise into noise with frame covariance γ^|m−n| along `frame_dim` (eq. 4)."""
    gamma = check_gamma(gamma)
    if gamma == 0.0:
        return eps  # Σ_f(0) = I: the i.i.d. draw already has it, and stays bit-identical to stock diffusers
    scale = math.sqrt(1.0 - gamma * gamma)
    frames = list(eps.unbind(frame_dim))
    out = [frames[0]]
    for e in frames[1:]:
        out.append(gamma * out[-1] + scale * e)
    return torch.stack(out, dim=frame_dim)


def _draw(shape, gamma: float, generator, device, dtype, frames: str, mix) -> torch.Tensor:
    """The pipeline's own i.i.d. draw (`randn_tensor`, so γ = 0 is the stock latents bit for bit), mixed across
    frames by `mix` in float32 and cast to `dtype` at the end."""
    if len(shape) != 5:
        raise ValueError(f"shape must be (batch, channels, {frames}, height, width), got {tuple(shape)}")
    if any(int(s) < 1 for s in shape):
        raise ValueError(f"every dimension of shape must be >= 1, got {tuple(shape)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if gamma == 0.0:
        return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
    eps = randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return mix(eps).to(dtype or torch.float32)


def noise_prior(
    shape: Sequence[int],
    gamma: float = 0.15,
    generator: torch.Generator | list[torch.Generator] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample latents of `shape` = (batch, channels, frames, height, width) from the 3D Gaussian noise prior.

    The i.i.d. draw is `diffusers.utils.torch_utils.randn_tensor(shape, generator, device, dtype)`, the very
    call AnimateDiffPipeline makes, so γ = 0 reproduces the stock pipeline's latents exactly. The recurrence
    runs in float32 for accuracy and is cast to `dtype` at the end.
    """
    gamma = check_gamma(gamma)
    return _draw(shape, gamma, generator, device, dtype, "frames", lambda eps: correlate_frames(eps, gamma))


def frame_covariance(frames: int, gamma: float) -> torch.Tensor:
    """Σ_f(γ) of eq. 4 as a dense (frames, frames) matrix; for tests and plots, not for sampling."""
    gamma = check_gamma(gamma)
    idx = torch.arange(frames, dtype=torch.float64)
    return torch.tensor(gamma, dtype=torch.float64) ** (idx[:, None] - idx[None, :]).abs()


def latent_frame_groups(latent_frames: int, temporal_scale: int = 4) -> list[range]:
    """The video frames each latent frame of a causal video VAE encodes: frame 0 alone, then `temporal_scale` each."""
    return [range(0, 1)] + [range(1 + (j - 1) * temporal_scale, 1 + j * temporal_scale) for j in range(1, latent_frames)]


def latent_frame_covariance(latent_frames: int, gamma: float, temporal_scale: int = 4) -> torch.Tensor:
    """R of the Wan latent prior (module docstring): correlation of the eq. 4 noise averaged over each frame group."""
    gamma = check_gamma(gamma)
    groups = latent_frame_groups(latent_frames, temporal_scale)
    average = torch.zeros(latent_frames, groups[-1].stop, dtype=torch.float64)
    for j, group in enumerate(groups):
        average[j, group.start : group.stop] = 1.0 / len(group)
    c = average @ frame_covariance(groups[-1].stop, gamma) @ average.T
    d = c.diagonal().rsqrt()
    return d[:, None] * c * d[None, :]


def latent_noise_prior(
    shape: Sequence[int],
    gamma: float = 0.15,
    generator: torch.Generator | list[torch.Generator] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    temporal_scale: int = 4,
) -> torch.Tensor:
    """Initial Wan latents of `shape` = (batch, channels, latent frames, height, width) with latent-frame covariance R.

    R (`latent_frame_covariance`) carries the per-video-frame γ of eq. 4 through the VAE's 1 + 4k frame
    grouping; the draw is `randn_tensor(shape, generator, device, dtype)` as `WanPipeline.prepare_latents`
    makes it, mixed across latent frames by R's Cholesky factor (float32, cast to `dtype` at the end).
    """
    gamma = check_gamma(gamma)

    def mix(eps: torch.Tensor) -> torch.Tensor:  # x = L·ε over latent frames, L Lᵀ = R
        chol = torch.linalg.cholesky(latent_frame_covariance(shape[2], gamma, temporal_scale)).to(eps.device, torch.float32)
        return torch.einsum("ij,bcjhw->bcihw", chol, eps)

    return _draw(shape, gamma, generator, device, dtype, "latent frames", mix)
