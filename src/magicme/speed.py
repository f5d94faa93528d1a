"""Speed and memory options for a loaded pipeline (no effect on the method, only on how fast it runs).

Defaults are the options that should never hurt (`benchmarks/gpu.py` times each one switched off): bf16 weights on GPUs that have it (else fp16), channels-last
layout on CUDA, PyTorch SDPA attention in the spatial and the motion layers (diffusers' default
processor; flash attention where the GPU and head size allow), fused q/k/v projections (one GEMM
instead of three), classifier-free guidance as one batched UNet call (the pipeline's own behaviour)
and VAE decoding in chunks of at most `DECODE_PIXELS` (bounded memory at any size). `low_vram` trades
speed for memory so 16 frames at 512×512 fit an 8 GB GPU; `compile` is opt-in because its first call
is slow (inductor caches it across runs); `fp8` is opt-in because it changes the numbers (a little).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
DECODE_PIXELS = 4 * 512 * 512  # output pixels per VAE decode call: 4 frames at 512², 1 at 1024²
FP8_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards
E4M3_MAX = 448.0  # largest finite float8 e4m3 value


@dataclass(frozen=True)
class SpeedOptions:
    dtype: str = "auto"  # auto: bf16 on CUDA GPUs that have it, else fp16; fp32 on CPU
    channels_last: bool = True  # CUDA only: faster convolutions with cuDNN
    compile: bool = False  # torch.compile the UNet and its motion modules (cached by inductor across runs)
    low_vram: bool = False  # model CPU offload + VAE slicing/tiling + motion-module chunking
    attention_slicing: bool = False  # diffusers' sliced attention (slower; SDPA is already memory-efficient)
    fuse_qkv: bool = True  # one q/k/v projection per attention (not with attention slicing)
    decode_chunk: int = 0  # frames per VAE decode call; 0: as many as fit DECODE_PIXELS
    compile_mode: str = "max-autotune-no-cudagraphs"  # or max-autotune (CUDA graphs: fixed shapes), default, reduce-overhead
    compile_cache: str | None = None  # inductor's cache folder (compiled graphs, autotuning); None: its default
    fp8: bool = False  # float8 linear layers (CUDA capability >= 8.9); best with compile

    def check(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}; got {self.compile_mode!r}")
        if not isinstance(self.decode_chunk, int) or isinstance(self.decode_chunk, bool) or self.decode_chunk < 0:
            raise ValueError(f"--decode-chunk must be an integer >= 0 (0: automatic), got {self.decode_chunk!r}")
        if self.fp8 and self.dtype not in ("auto", "bf16"):
            raise ValueError(f"--fp8 computes in bf16; it cannot be combined with --dtype {self.dtype}")
        if self.compile_cache is not None and os.path.exists(self.compile_cache) and not os.path.isdir(self.compile_cache):
            raise ValueError(f"--compile-cache {self.compile_cache!r} is a file, not a folder")

    def check_wan(self) -> None:
        """The options built for AnimateDiff's UNet, refused (not ignored) with the Wan backbone, which takes
        --dtype and --low-vram only."""
        for flag, on in (("--compile", self.compile), ("--fp8", self.fp8), ("--attention-slicing", self.attention_slicing),
                         ("--decode-chunk", self.decode_chunk != 0)):
            if on:
                raise ValueError(f"{flag} is for AnimateDiff's UNet; the Wan backbone takes --dtype and --low-vram only")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.fp8 else auto_dtype(device)
        return DTYPES[self.dtype]


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA GPUs with bf16 tensor cores (Ampere onwards), fp16 on older ones, fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    if not torch.cuda.is_available():  # a configuration named for a GPU where none can be asked (suite config ids)
        return torch.float16
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def check_fp8(device: torch.device) -> None:
    """FP8 needs float8 tensor cores; elsewhere it would be slower than bf16, so it is refused."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        have = f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}" if device.type == "cuda" else "a CPU"
        raise ValueError(f"--fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); this is {have}")


def apply_speed_options(pipe, options: SpeedOptions, device: torch.device):
    """Configure `pipe` (already in its dtype) for `device`; returns it, moved where it must run."""
    options.check()
    if options.fp8:
        check_fp8(device)
    if options.attention_slicing:
        slice_attention(pipe.unet)
    elif options.fuse_qkv:  # sliced attention needs the separate projections
        fuse_attention_projections(pipe.unet)
    if options.fp8:
        to_float8(pipe.unet)
    if options.low_vram:
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
        pipe.unet.enable_forward_chunking(chunk_size=1, dim=1)  # feed-forward of motion modules one frame group at a time
        if device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)  # each model on the GPU only while it runs
        else:
            pipe.to(device)
    else:
        pipe.to(device)
        if getattr(pipe, "motion_adapter", None) is not None:  # a copy of weights the UNet holds; FreeNoise reads its config
            pipe.motion_adapter.to("cpu")
        if not isinstance(pipe.vae.decode, ChunkedDecode):
            pipe.vae.decode = ChunkedDecode(pipe.vae.decode, options.decode_chunk, pipe.vae_scale_factor)
    if device.type == "cuda" and options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.compile:
        compile_unet(pipe.unet, options.compile_mode, options.compile_cache)
    return pipe


def compile_unet(unet, mode: str, cache: str | None = None) -> None:
    """torch.compile the UNet with its motion modules as one graph, in place (the pipeline keeps its module)."""
    if cache is not None:
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--compile-cache {cache!r}: cannot create the folder ({e.strerror})") from None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(cache)  # read by inductor when it first compiles
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True  # compiled graphs reused by later runs (and autotuning results, on by default)
    unet.compile(mode=mode, fullgraph=True)


# ---- VAE decode in chunks


class ChunkedDecode:
    """`vae.decode` on at most `frames` latents at a time (0: as many as fit DECODE_PIXELS): the same images, bounded memory.

    Installed as the VAE's `decode` (the pattern diffusers' docs use for `torch.compile(vae.decode)`), so every
    pipeline sharing the VAE (text-to-video, Face VCD, Tiled VCD) decodes in chunks.
    """

    def __init__(self, decode, frames: int, scale_factor: int):
        self.decode, self.frames, self.scale_factor = decode, frames, scale_factor

    def chunk(self, z: torch.Tensor) -> int:
        if self.frames:
            return self.frames
        return max(1, DECODE_PIXELS // (z.shape[-2] * z.shape[-1] * self.scale_factor**2))

    def __call__(self, z: torch.Tensor, return_dict: bool = True, **kwargs):
        from diffusers.models.autoencoders.vae import DecoderOutput

        n = self.chunk(z)
        if z.shape[0] <= n:
            return self.decode(z, return_dict=return_dict, **kwargs)
        sample = torch.cat([self.decode(part, return_dict=False, **kwargs)[0] for part in z.split(n)])
        return DecoderOutput(sample=sample) if return_dict else (sample,)


# ---- attention processors


def slice_attention(unet) -> None:
    """diffusers' sliced attention (half the heads at a time) in every spatial and motion layer.

    `pipe.enable_attention_slicing` skips the UNet of AnimateDiff (UNetMotionModel has no `set_attention_slice`),
    so it is set here. SDPA already avoids the full attention matrix; slicing helps only where it cannot.
    """
    from diffusers.models.attention_processor import SlicedAttnProcessor

    for attn in _attentions(unet):
        attn.set_processor(SlicedAttnProcessor(max(1, attn.heads // 2)))


# ---- fused q/k/v projections


def _plain_sdpa(attn) -> bool:
    """An attention we may fuse: diffusers' SDPA processor, plain Linear projections (no LoRA or IP-adapter)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    parts = [getattr(attn, n, None) for n in _fused_names(attn)[1]]
    return (
        type(attn.processor) is AttnProcessor2_0
        and all(type(p) is torch.nn.Linear for p in parts)
        and len({(p.out_features, p.bias is None) for p in parts}) == 1
        and getattr(attn, "add_q_proj", None) is None
    )


def _attentions(module):
    from diffusers.models.attention_processor import Attention

    return [m for m in module.modules() if isinstance(m, Attention)]


def _fused_names(attn) -> tuple[str, tuple[str, ...]]:
    return ("to_kv", ("to_k", "to_v")) if attn.is_cross_attention else ("to_qkv", ("to_q", "to_k", "to_v"))


def _stock_state_dict(attn, state_dict, prefix, local_metadata) -> None:
    """A fused attention's state dict in diffusers' layout (to_q/to_k/to_v): saved weights stay stock, and
    code that copies modules by state dict (FreeNoise) or compares weights sees no difference."""
    if not getattr(attn, "fused_projections", False):
        return
    name, names = _fused_names(attn)
    for p in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}{name}.{p}", None)
        if fused is not None:
            for n, part in zip(names, fused.chunk(len(names))):
                state_dict[f"{prefix}{n}.{p}"] = part.clone()  # own storage: safetensors refuses shared tensors


def _load_into_fused(attn, state_dict, prefix, *args) -> None:
    """Stock to_q/to_k/to_v weights loaded into a fused attention."""
    if not getattr(attn, "fused_projections", False):
        return
    name, names = _fused_names(attn)
    for p in ("weight", "bias"):
        keys = [f"{prefix}{n}.{p}" for n in names]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{name}.{p}"] = torch.cat([state_dict.pop(k) for k in keys])


def fuse_attention_projections(module) -> int:
    """Fuse q/k/v (self-attention) or k/v (cross-attention) of every plain SDPA attention in `module`.

    The separate projections are replaced, not kept beside the fused one (no extra memory); `unfuse_attention`
    restores them exactly, and the state dict keeps diffusers' layout. Covers the spatial layers and the
    motion modules. Returns how many were fused.
    """
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    count = 0
    for attn in _attentions(module):
        if getattr(attn, "fused_projections", False) or not _plain_sdpa(attn):
            continue
        if not getattr(attn, "_stock_state_dict_hooks", False):
            attn.register_state_dict_post_hook(_stock_state_dict)
            attn.register_load_state_dict_pre_hook(_load_into_fused)
            attn._stock_state_dict_hooks = True
        names = _fused_names(attn)[1]
        parts = [getattr(attn, n) for n in names]
        w = parts[0].weight
        fused = torch.nn.Linear(w.shape[1], sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                                device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        fused.requires_grad_(False)
        for n in names:
            delattr(attn, n)
        setattr(attn, _fused_names(attn)[0], fused)
        attn.fused_projections = True
        attn.set_processor(FusedAttnProcessor2_0())
        count += 1
    return count


def unfuse_attention(module) -> None:
    """Split every fused projection in `module` back into to_q/to_k/to_v (bit-exact) with the SDPA processor."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for attn in _attentions(module):
        if not getattr(attn, "fused_projections", False) or not hasattr(attn, _fused_names(attn)[0]):
            continue
        name, names = _fused_names(attn)
        fused = getattr(attn, name)
        weights = fused.weight.detach().chunk(len(names))
        biases = fused.bias.detach().chunk(len(names)) if fused.bias is not None else [None] * len(names)
        for n, w, b in zip(names, weights, biases):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            setattr(attn, n, lin.requires_grad_(False))
        delattr(attn, name)
        attn.fused_projections = False
        attn.set_processor(AttnProcessor2_0())


# ---- FP8 linear layers


def rowwise_float8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) as float8 e4m3 with one float32 scale per row: x ≈ q * scale, the row's max at E4M3_MAX.

    Bit for bit torchao's per-row float8 quantisation (its scale is divided in x's dtype), except that an
    all-zero row gets a tiny scale instead of 0/0."""
    scale = (x.detach().abs().amax(dim=1, keepdim=True) / E4M3_MAX).float().clamp(min=1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Float8Linear(torch.nn.Module):
    """y = x Wᵀ + b with x and W in float8 e4m3, one scale per row of each (dynamic activation scaling).

    The recipe of torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`, on
    `torch._scaled_mm` directly. The weight is stored as uint8 so a later `.to(dtype)` cannot cast it.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        q, scale = rowwise_float8(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp8", q.view(torch.uint8))
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # (1, N): the layout _scaled_mm wants
        self.bias = linear.bias

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's name: diffusers passes input=
        x = input
        rows = x.reshape(-1, x.shape[-1])
        q, scale = rowwise_float8(rows)
        w = self.weight_fp8.view(torch.float8_e4m3fn)
        y = torch._scaled_mm(q, w.t(), scale_a=scale, scale_b=self.weight_scale.float(), out_dtype=torch.bfloat16).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_linear(self) -> torch.nn.Linear:
        """The dequantised layer (the weight FP8 computed with), in the bias' dtype or bf16."""
        dtype = self.bias.dtype if self.bias is not None else torch.bfloat16
        w = self.weight_fp8.view(torch.float8_e4m3fn).float() * self.weight_scale.float().reshape(-1, 1)
        lin = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias = self.bias
        return lin.requires_grad_(False)


def _replace_children(module, convert) -> int:
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def to_float8(module) -> int:
    """Every Linear of `module` whose sides are multiples of 16 (what float8 GEMMs need) → Float8Linear."""
    def convert(m):
        if type(m) is torch.nn.Linear and m.in_features % 16 == 0 and m.out_features % 16 == 0:
            return Float8Linear(m)
        return None

    return _replace_children(module, convert)


def from_float8(module) -> int:
    return _replace_children(module, lambda m: m.to_linear() if isinstance(m, Float8Linear) else None)


# ---- diffusers' FreeNoise rebuilds the motion modules' blocks from their state dicts


def _motion_modules(unet) -> list:
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [m for b in blocks for m in (getattr(b, "motion_modules", None) or [])]


@contextmanager
def plain_motion_modules(unet):
    """Motion modules with diffusers' own layers inside the block (FreeNoise's strict state-dict copy needs them).

    Fused projections and FP8 layers are undone in the motion modules on entry and redone on exit, with
    sliced attention, on whatever blocks are there then (FreeNoise replaces them twice, with diffusers'
    default processor). Spatial layers keep them throughout.
    """
    from diffusers.models.attention_processor import SlicedAttnProcessor

    modules = _motion_modules(unet)
    fused = any(getattr(a, "fused_projections", False) for m in modules for a in _attentions(m))
    sliced = any(isinstance(a.processor, SlicedAttnProcessor) for m in modules for a in _attentions(m))
    fp8 = any(isinstance(x, Float8Linear) for m in modules for x in m.modules())
    for m in modules:
        from_float8(m)  # first: a fused projection may itself be FP8
        unfuse_attention(m)
    try:
        yield unet
    finally:
        for m in _motion_modules(unet):
            if fused:
                fuse_attention_projections(m)
            if sliced:
                slice_attention(m)
            if fp8:
                to_float8(m)
