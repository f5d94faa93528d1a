"""Every speed option gives the plain path's video within a stated tolerance (tiny preset, CPU).

Tolerances: exact or float32 rounding (≤ 1e-5 on [0, 1] pixels) for the options that change only the
order of arithmetic (fused q/k/v, SDPA, chunked VAE decode, low-VRAM, compile); FP8 is lossy by design:
each GEMM is bounded by float8 e4m3's rounding, and the video stays within 25 dB PSNR of the plain one.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magicme.generate import generate_video
from magicme.models import ModelSpec, load_pipeline, tiny_components
from magicme.speed import (
    DECODE_PIXELS,
    ChunkedDecode,
    Float8Linear,
    SpeedOptions,
    apply_speed_options,
    from_float8,
    fuse_attention_projections,
    rowwise_float8,
    to_float8,
    unfuse_attention,
)

KW = dict(seed=3, frames=4, height=64, width=64, steps=2)
CPU = torch.device("cpu")


def plain_pipe():
    """Stock diffusers: no option of ours applied."""
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(options: SpeedOptions = SpeedOptions()):
    pipe = load_pipeline(ModelSpec(speed=options), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def plain_video():
    return generate_video(plain_pipe(), "a dog", **KW)


def processors(pipe) -> dict:
    return {name: type(p).__name__ for name, p in pipe.unet.attn_processors.items()}


def test_spatial_and_motion_attention_run_on_sdpa():
    """diffusers' default processor (SDPA) in both kinds of layer; ours fuses all of them and keeps SDPA."""
    plain = processors(plain_pipe())
    assert any("motion_modules" in n for n in plain) and any("attentions" in n for n in plain)
    assert set(plain.values()) == {"AttnProcessor2_0"}
    fused = processors(ours())
    assert fused.keys() == plain.keys() and set(fused.values()) == {"FusedAttnProcessor2_0"}


def test_sdpa_matches_the_classic_attention(plain_video):
    """SDPA against diffusers' explicit softmax(QKᵀ/√d)V processor, the published definition."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = plain_pipe()
    pipe.unet.set_attn_processor(AttnProcessor())
    np.testing.assert_allclose(generate_video(pipe, "a dog", **KW), plain_video, atol=1e-5)


def test_default_options_match_the_plain_pipeline(plain_video):
    """Fused q/k/v + chunked VAE decode (the CPU defaults) against stock diffusers."""
    np.testing.assert_allclose(generate_video(ours(), "a dog", **KW), plain_video, atol=1e-5)
    np.testing.assert_allclose(generate_video(ours(SpeedOptions(fuse_qkv=False, decode_chunk=1)), "a dog", **KW), plain_video, atol=1e-5)


def test_fusing_replaces_the_projections_and_unfusing_restores_them_exactly(tmp_path):
    from safetensors.torch import save_file

    unet = plain_pipe().unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    n_params = sum(p.numel() for p in unet.parameters())
    assert fuse_attention_projections(unet) == 22
    assert sum(p.numel() for p in unet.parameters()) == n_params  # no second copy of the weights
    assert fuse_attention_projections(unet) == 0  # idempotent
    assert any(name.endswith("to_qkv") for name, _ in unet.named_modules())

    def same(state):
        return state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)

    assert same(unet.state_dict())  # diffusers' layout: saved weights load in stock diffusers
    save_file(unet.state_dict(), str(tmp_path / "unet.safetensors"))
    unet.load_state_dict({k: torch.zeros_like(v) for k, v in before.items()})  # stock keys load into fused layers
    assert all(not v.any() for v in unet.state_dict().values())
    unet.load_state_dict(before)
    unfuse_attention(unet)
    assert same(unet.state_dict())
    assert not any(name.endswith("to_qkv") for name, _ in unet.named_modules())
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_low_vram_matches_default_output(plain_video):
    pipe = ours(SpeedOptions(low_vram=True))
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    np.testing.assert_allclose(generate_video(pipe, "a dog", **KW), plain_video, atol=1e-4)


def test_attention_slicing_reaches_every_layer_and_matches(plain_video):
    """diffusers' `enable_attention_slicing` skips UNetMotionModel; ours slices spatial and motion layers."""
    pipe = ours(SpeedOptions(attention_slicing=True))
    assert set(processors(pipe).values()) == {"SlicedAttnProcessor"} and len(processors(pipe)) == 22
    np.testing.assert_allclose(generate_video(pipe, "a dog", **KW), plain_video, atol=1e-5)


@torch.no_grad()
def test_chunked_decode_bounds_the_batch_and_keeps_the_images():
    vae = plain_pipe().vae
    calls = []

    def decode(z, return_dict=True):
        calls.append(len(z))
        return vae.decode(z, return_dict=return_dict)

    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = vae.decode(z).sample
    np.testing.assert_allclose(ChunkedDecode(decode, 2, 8)(z).sample, whole, atol=1e-5)
    assert calls == [2, 2, 1]
    np.testing.assert_allclose(ChunkedDecode(decode, 2, 8)(z, return_dict=False)[0], whole, atol=1e-5)
    auto = ChunkedDecode(decode, 0, 8)
    assert [auto.chunk(torch.empty(1, 4, s // 8, s // 8)) for s in (512, 1024, 256)] == [4, 1, 16]
    assert DECODE_PIXELS == 4 * 512 * 512


def test_pipeline_decodes_in_chunks(plain_video):
    pipe = ours(SpeedOptions(decode_chunk=3))
    sizes = []
    inner = pipe.vae.decode.decode
    pipe.vae.decode.decode = lambda z, **kw: sizes.append(len(z)) or inner(z, **kw)
    np.testing.assert_allclose(generate_video(pipe, "a dog", **KW), plain_video, atol=1e-5)
    assert sizes == [3, 1]  # 4 frames


def test_cfg_runs_as_one_batched_unet_call():
    """diffusers batches the conditional and unconditional halves: one UNet call of batch 2 per step."""
    pipe = ours()
    batches = []
    pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    generate_video(pipe, "a dog", guidance=7.5, **KW)
    assert batches == [2] * KW["steps"]


# ---- FP8


def test_float8_linear_is_within_e4m3_rounding_of_the_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 10, 64) * torch.logspace(-2, 1, 64)  # columns of very different size
    fp8 = Float8Linear(lin)
    exact = F.linear(x, lin.weight, lin.bias)
    # each factor is off by at most half a step of e4m3: 2⁻⁴ relative (3-bit mantissa), or 2⁻¹⁰ of its row's
    # scale (amax / 448) among the subnormals; the product's error follows, plus bf16 rounding of the output
    sx = x.abs().amax(-1, keepdim=True) / 448
    sw = lin.weight.abs().amax(-1, keepdim=True) / 448
    a = 2**-4 * x.abs() + 2**-10 * sx  # (3, 10, 64)
    b = 2**-4 * lin.weight.abs() + 2**-10 * sw  # (48, 64)
    bound = a @ lin.weight.abs().T + x.abs() @ b.T + a @ b.T + 2**-8 * exact.abs() + 1e-6
    err = (fp8(x) - exact).abs()
    assert (err <= bound).all()
    assert err.max() > 0  # it really is quantised
    back = fp8.to_linear()
    np.testing.assert_allclose(F.linear(x, back.weight, back.bias).detach(), exact.detach(), rtol=0.2, atol=0.2)
    fp8.to(torch.float16)  # a later pipe.to(dtype) must not cast the stored float8 weight
    assert fp8.weight_fp8.dtype == torch.uint8


def test_float8_matches_torchao_per_row_recipe():
    """Per-row float8 of activations and weights against torchao's own quantisation primitives (the torch path of
    its `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`, whose GEMM needs a GPU but whose
    quantisation does not), and the layer against the GEMM of torchao's dequantised tensors. Runs where torchao
    is installed (not in our environments: transformers imports it at start-up whenever it is present)."""
    ao = pytest.importorskip("torchao.quantization.quant_primitives")

    def reference(t):
        scale = ao._choose_scale_float8(t, block_size=[1, t.shape[1]], float8_dtype=torch.float8_e4m3fn)
        return ao._quantize_affine_float8(t, scale, torch.float8_e4m3fn), scale

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(33, 64) * torch.logspace(-3, 2, 33)[:, None]).to(dtype)  # rows of very different size
        (q, scale), (ref_q, ref_scale) = rowwise_float8(x), reference(x)
        assert torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), dtype
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16) * 3
    deq_x = ao._dequantize_affine_float8(*reference(x.reshape(-1, 64)))
    deq_w = ao._dequantize_affine_float8(*reference(lin.weight.detach()))
    expected = ((deq_x @ deq_w.T).to(torch.bfloat16) + lin.bias.detach()).reshape(2, 5, 48)
    np.testing.assert_allclose(Float8Linear(lin)(x).detach().float(), expected.float(), rtol=2**-7, atol=1e-6)


def test_fp8_video_within_tolerance_and_round_trip(plain_video):
    pipe = plain_pipe()
    fuse_attention_projections(pipe.unet)
    n = to_float8(pipe.unet)
    assert n > 0 and sum(isinstance(m, Float8Linear) for m in pipe.unet.modules()) == n
    video = generate_video(pipe, "a dog", **KW)
    mse = float(np.mean((video - plain_video) ** 2))
    assert 0 < mse and 10 * np.log10(1 / mse) >= 25
    assert from_float8(pipe.unet) == n and not any(isinstance(m, Float8Linear) for m in pipe.unet.modules())


def test_fp8_is_refused_without_float8_tensor_cores(tmp_path):
    from magicme.cli import main

    with pytest.raises(ValueError, match="compute capability 8.9"):
        apply_speed_options(plain_pipe(), SpeedOptions(fp8=True), CPU)
    with pytest.raises(ValueError, match="--fp8 computes in bf16"):
        SpeedOptions(fp8=True, dtype="fp16").check()
    assert main(["generate", "--prompt", "a dog", "--fp8", "--device", "cpu", "--out", str(tmp_path / "x.gif")]) == 2


def test_long_clips_keep_fused_and_fp8_layers_around_freenoise():
    """FreeNoise rebuilds the motion blocks from their state dicts; ours step aside and come back."""
    from magicme.long_video import plan_windows

    kw = dict(seed=1, frames=20, height=64, width=64, steps=2, windows=plan_windows(20, None, 4, "pyramid"))
    plain = generate_video(plain_pipe(), "a dog", **kw)
    pipe = ours()
    np.testing.assert_allclose(generate_video(pipe, "a dog", **kw), plain, atol=1e-5)
    assert set(processors(pipe).values()) == {"FusedAttnProcessor2_0"}
    to_float8(pipe.unet)
    n = sum(isinstance(m, Float8Linear) for m in pipe.unet.modules())
    generate_video(pipe, "a dog", **kw)
    assert sum(isinstance(m, Float8Linear) for m in pipe.unet.modules()) == n
    sliced = ours(SpeedOptions(attention_slicing=True))
    generate_video(sliced, "a dog", **kw)
    assert set(processors(sliced).values()) == {"SlicedAttnProcessor"}


# ---- dtype, flags, record


def test_dtype_choice_and_bad_options(monkeypatch):
    assert SpeedOptions().torch_dtype(CPU) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # nothing to ask: the choice that runs everywhere
    assert SpeedOptions().torch_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert SpeedOptions().torch_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert SpeedOptions().torch_dtype(torch.device("cuda")) == torch.float16
    assert SpeedOptions(dtype="bf16").torch_dtype(CPU) == torch.bfloat16
    assert SpeedOptions(fp8=True).torch_dtype(torch.device("cuda")) == torch.bfloat16
    for bad, match in ((dict(dtype="fp8"), "--dtype"), (dict(compile_mode="fast"), "--compile-mode"),
                       (dict(decode_chunk=-1), "--decode-chunk")):
        with pytest.raises(ValueError, match=match):
            SpeedOptions(**bad).check()


def test_no_host_sync_of_ours_inside_the_denoising_loop(tmp_path):
    """Between the first and the last UNet call, nothing in magicme reads a tensor back to the host.

    (diffusers' DDIM step indexes its CPU table with the GPU timestep: its own, counted by the GPU benchmark.)
    """
    import traceback
    from pathlib import Path

    from torch.overrides import TorchFunctionMode

    import magicme
    from magicme.generate import GenerateConfig, generate
    from magicme.workspace import step_reporter

    ours_dir = str(Path(magicme.__file__).parent)
    sync_ops = {"item", "__bool__", "tolist", "__float__", "__int__", "__index__", "cpu", "numpy"}
    events, marks = [], []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in sync_ops:
                frames = [f for f in traceback.extract_stack()[:-1] if "torch/" not in f.filename]
                events.append((func.__name__, frames[-1].filename if frames else "?"))
            return func(*args, **(kwargs or {}))

    pipe = ours()
    pipe.unet.register_forward_pre_hook(lambda *a: marks.append(("start", len(events))))
    pipe.unet.register_forward_hook(lambda *a: marks.append(("end", len(events))))
    cfg = GenerateConfig(prompts=["a dog"], frames=4, steps=3, prompt_at={2: "a cat"})
    with Spy():
        generate(cfg, tmp_path / "v.gif", pipe=pipe, quiet=True, step_callback=step_reporter(lambda _: None, lambda: None))
    first = next(i for kind, i in marks if kind == "start")
    last = [i for kind, i in marks if kind == "end"][-1]
    in_loop = events[first:last]
    assert not [e for e in in_loop if e[1].startswith(ours_dir)], in_loop


def test_cli_speed_flags_reach_the_pipeline_and_the_record(tmp_path):
    from magicme.cli import main
    from magicme.video import read_sidecar

    out = tmp_path / "v.gif"
    assert main(["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--low-vram", "--attention-slicing",
                 "--out", str(out), "--quiet"]) == 0
    speed = read_sidecar(out)["models"]["speed"]
    assert speed["low_vram"] is True and speed["attention_slicing"] is True and speed["dtype"] == "auto"
    out = tmp_path / "w.gif"
    assert main(["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--no-fuse-qkv", "--decode-chunk", "1",
                 "--compile-mode", "max-autotune", "--out", str(out), "--quiet"]) == 0
    speed = read_sidecar(out)["models"]["speed"]
    assert speed["fuse_qkv"] is False and speed["decode_chunk"] == 1 and speed["compile_mode"] == "max-autotune"
    assert speed["fp8"] is False and speed["compile"] is False
    assert main(["generate", "--prompt", "a dog", "--dtype", "fp8", "--out", str(tmp_path / "x.gif")]) == 2
    assert main(["generate", "--prompt", "a dog", "--decode-chunk", "-2", "--out", str(tmp_path / "y.gif")]) == 2


def test_unusable_compile_cache_is_one_clear_error(tmp_path):
    from magicme.speed import compile_unet

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--compile-cache .* cannot create the folder"):
        compile_unet(torch.nn.Linear(2, 2), "default", cache=str(tmp_path / "file" / "cache"))
    with pytest.raises(ValueError, match="is a file"):
        SpeedOptions(compile=True, compile_cache=str(tmp_path / "file")).check()


def test_wan_refuses_the_unet_only_options(tmp_path):
    """Options that only AnimateDiff's UNet path implements are a one-line exit 2 with Wan, not silently ignored."""
    import subprocess
    import sys

    for flag, options in (("--compile", SpeedOptions(compile=True)), ("--fp8", SpeedOptions(fp8=True)),
                          ("--attention-slicing", SpeedOptions(attention_slicing=True)), ("--decode-chunk", SpeedOptions(decode_chunk=2))):
        with pytest.raises(ValueError, match=flag):
            ModelSpec(backbone="wan", speed=options).check()
    ModelSpec(backbone="wan", speed=SpeedOptions(dtype="bf16", low_vram=True)).check()
    done = subprocess.run([sys.executable, "-m", "magicme.cli", "generate", "--prompt", "a dog", "--backbone", "wan", "--compile",
                           "--out", str(tmp_path / "x.mp4")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--compile is for AnimateDiff's UNet" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.mp4").exists()


def test_video_to_video_stages_record_the_speed_options(tmp_path):
    from magicme.face import FaceConfig
    from magicme.upscale import UpscaleConfig
    from magicme.v2v import stage_record

    spec = ModelSpec(speed=SpeedOptions(fp8=True, decode_chunk=2))
    for cfg in (FaceConfig(prompt="a dog", models=spec), UpscaleConfig(prompt="a dog", models=spec)):
        speed = stage_record("face", cfg, tmp_path / "in.mp4", (4, 64, 64))["models"]["speed"]
        assert speed["fp8"] is True and speed["decode_chunk"] == 2


@pytest.mark.slow
def test_compiled_unet_matches_eager(plain_video, tmp_path, monkeypatch):
    """fullgraph compile of the UNet with its motion modules (minutes on a CPU), its cache in the folder asked for."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "unused"))  # restored after the test
    cache = tmp_path / "inductor"
    pipe = ours(SpeedOptions(compile=True, compile_mode="default", compile_cache=str(cache)))
    np.testing.assert_allclose(generate_video(pipe, "a dog", **KW), plain_video, atol=1e-4)
    assert any(cache.rglob("*.py"))  # generated kernels landed in our cache folder
