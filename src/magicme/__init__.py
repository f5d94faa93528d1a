"""magicme: identity-specific video generation (Magic-Me / Video Custom Diffusion).

Heavy modules (torch, diffusers) load on first use, so `import magicme` and `magicme --help` stay fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "noise_prior": "noise_prior",
    "frame_covariance": "noise_prior",
    "GenerateConfig": "generate",
    "generate": "generate",
    "generate_video": "generate",
    "ModelSpec": "models",
    "load_pipeline": "models",
    "tiny_components": "models",
    "save_tiny_model": "models",
    "PrepareConfig": "prepare",
    "prepare_identity_set": "prepare",
    "SegmenterConfig": "segment",
    "TrainConfig": "train",
    "train": "train",
    "masked_diffusion_loss": "train",
    "read_video": "video",
    "write_video": "video",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'magicme' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
