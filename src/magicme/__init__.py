"""magicme: identity-specific video generation (Magic-Me / Video Custom Diffusion).

Heavy modules (torch, diffusers) load on first use, so `import magicme` and `magicme --help` stay fast.
Four exports share their submodule's name (`generate`, `noise_prior`, `train`, `v2v`): `magicme.generate`
is the function; the module is `sys.modules["magicme.generate"]` (`from magicme.generate import …` works).
"""

import sys
from importlib import import_module
from types import ModuleType

__version__ = "0.1.0"

_EXPORTS = {
    "noise_prior": "noise_prior",
    "frame_covariance": "noise_prior",
    "GenerateConfig": "generate",
    "generate": "generate",
    "generate_video": "generate",
    "plan_windows": "long_video",
    "prompt_schedule": "long_video",
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
    "V2VConfig": "v2v",
    "v2v": "v2v",
    "FaceConfig": "face",
    "face_vcd": "face",
    "UpscaleConfig": "upscale",
    "tiled_vcd": "upscale",
    "read_video": "video",
    "Scorer": "evaluate",
    "MetricModels": "evaluate",
    "evaluate_video": "evaluate",
    "load_suite": "suite",
    "run_suite": "suite",
    "write_report": "report",
    "write_video": "video",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'magicme' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)


class _Package(ModuleType):
    """The import system binds a loaded submodule as an attribute of its package, which would hide the
    exported function of the same name from `__getattr__`; such a binding is skipped for exported names."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Package
