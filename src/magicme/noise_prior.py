"""3D Gaussian noise prior (paper §4.1).

Initial latents for f frames are drawn from N(0, Σ_f(γ)) with Σ_f(γ)[m, n] = γ^|m−n| (eq. 4),
independently at every (batch, channel, y, x) position. That covariance is exactly the one of a
stationary AR(1) process, so it is sampled in O(f) with no matrix factorisation:

    x_0 = ε_0,    x_n = γ·x_{n−1} + sqrt(1 − γ²)·ε_n,    ε ~ N(0, I)

Var(x_n) = γ²·1 + (1 − γ²) = 1 and Cov(x_m, x_n) = γ^|m−n|.
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
    if len(shape) != 5:
        raise ValueError(f"shape must be (batch, channels, frames, height, width), got {tuple(shape)}")
    if any(int(s) < 1 for s in shape):
        raise ValueError(f"every dimension of shape must be >= 1, got {tuple(shape)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if gamma == 0.0:
        return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
    eps = randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return correlate_frames(eps, gamma).to(dtype or torch.float32)


def frame_covariance(frames: int, gamma: float) -> torch.Tensor:
    """Σ_f(γ) of eq. 4 as a dense (frames, frames) matrix; for tests and plots, not for sampling."""
    gamma = check_gamma(gamma)
    idx = torch.arange(frames, dtype=torch.float64)
    return torch.tensor(gamma, dtype=torch.float64) ** (idx[:, None] - idx[None, :]).abs()
