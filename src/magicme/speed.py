"""Speed and memory options for a loaded pipeline (no effect on the method, only on how fast it runs).

Defaults are the options that never hurt: half-precision weights and channels-last layout on CUDA,
PyTorch SDPA attention (diffusers' default processor), classifier-free guidance as one batched UNet
call and VAE decoding in chunks of 16 frames (both the pipeline's own behaviour). `low_vram` trades speed for
memory so 16 frames at 512×512 fit an 8 GB GPU; `compile` is opt-in because its first call is slow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class SpeedOptions:
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    channels_last: bool = True  # CUDA only: faster convolutions with cuDNN
    compile: bool = False  # torch.compile the UNet (cached by inductor across runs)
    low_vram: bool = False  # model CPU offload + VAE slicing/tiling + motion-module chunking + attention slicing
    attention_slicing: bool = False

    def check(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


def apply_speed_options(pipe, options: SpeedOptions, device: torch.device):
    """Configure `pipe` (already in its dtype) for `device`; returns it, moved where it must run."""
    options.check()
    if options.low_vram:
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
        pipe.unet.enable_forward_chunking(chunk_size=1, dim=1)  # feed-forward of motion modules one frame group at a time
        pipe.enable_attention_slicing("auto")
        if device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)  # each model on the GPU only while it runs
        else:
            pipe.to(device)
    else:
        if options.attention_slicing:
            pipe.enable_attention_slicing("auto")
        pipe.to(device)
    if device.type == "cuda" and options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.compile:
        pipe.unet.compile(mode="max-autotune-no-cudagraphs")  # in place: the pipeline keeps its UNetMotionModel
    return pipe
