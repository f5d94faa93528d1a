import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline
from diffusers.models.attention import BasicTransformerBlock, FreeNoiseTransformerBlock
from diffusers.pipelines.free_noise_utils import SplitInferenceModule

from magicme.cli import main
from magicme.generate import GenerateConfig, generate, generate_video, initial_latents
from magicme.long_video import (
    WEIGHTING_SCHEMES,
    context_windows,
    parse_prompt_at,
    plan_windows,
    prompt_schedule,
    tiled_frames,
)
from magicme.models import ModelSpec, load_motion_adapter, load_pipeline, tiny_components
from magicme.noise_prior import frame_covariance
from magicme.video import read_sidecar, read_video


@pytest.fixture(scope="module")
def long_pipe():
    """Our own tiny pipeline: these tests switch FreeNoise/FreeInit on and off in it."""
    pipe = load_pipeline(ModelSpec(base="tiny"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StopAfterLatents(Exception):
    """Raised by `capture_latents(stop=True)` once the latents are known: no need to denoise."""


def capture_latents(pipe, monkeypatch, stop: bool = False) -> list:
    """Record what `prepare_latents` hands to the denoising loop (after FreeNoise's own handling)."""
    seen = []
    original = pipe.prepare_latents

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach().clone())
        if stop:
            raise StopAfterLatents
        return out

    monkeypatch.setattr(pipe, "prepare_latents", wrapped)
    return seen


def count_unet_calls(pipe, monkeypatch) -> list:
    calls = []
    original = pipe.unet.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", counted)
    return calls


@pytest.mark.parametrize("frames, length, stride", [(17, 16, 4), (26, 16, 4), (40, 16, 4), (64, 16, 8), (33, 8, 3), (16, 16, 4)])
def test_windows_cover_every_frame_and_tile_the_clip(frames, length, stride):
    padded = tiled_frames(frames, length, stride)
    assert frames <= padded < frames + stride
    windows = context_windows(padded, length, stride)
    covered = np.zeros(padded, bool)
    for start, end in windows:
        assert end - start == length
        covered[start:end] = True
    assert covered.all()
    assert [s for s, _ in windows] == list(range(0, padded - length + 1, stride))  # regular windows only
    assert windows[-1][1] == padded


@pytest.mark.parametrize("frames", [17, 26, 30, 40])
@pytest.mark.parametrize("weighting", WEIGHTING_SCHEMES)
def test_freenoise_blend_weights_sum_to_one_on_planned_windows(frames, weighting):
    # diffusers' own FreeNoise block with its attention and feed-forward outputs zeroed: every window then
    # returns its input, so the blended output equals the input exactly when each frame's weights sum to one
    plan = plan_windows(frames, None, 4, weighting)
    block = FreeNoiseTransformerBlock(
        dim=8, num_attention_heads=2, attention_head_dim=4, double_self_attention=True,
        context_length=plan.length, context_stride=plan.stride, weighting_scheme=weighting,
    )
    for linear in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[2]):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    x = torch.randn(3, plan.padded_frames, 8, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        y = block(x)
    assert torch.allclose(y, x, atol=1e-5)


def test_long_clip_latents_have_prior_covariance_over_all_frames(long_pipe, monkeypatch):
    gamma, frames, size = 0.6, 40, 256
    seen = capture_latents(long_pipe, monkeypatch, stop=True)
    with pytest.raises(StopAfterLatents):
        generate_video(long_pipe, "a dog", seed=7, frames=frames, height=size, width=size, steps=1, guidance=1.0,
                       gamma=gamma, windows=plan_windows(frames, None, 4, "pyramid"))
    assert not long_pipe.free_noise_enabled  # restored even though the call was cut short
    [latents] = seen
    assert latents.shape == (1, 4, frames, size // 8, size // 8)
    # ours, unchanged: FreeNoise neither redraws nor shuffles them
    expected = initial_latents(long_pipe, 1, frames, size, size, gamma, torch.Generator().manual_seed(7))
    assert torch.equal(latents, expected * long_pipe.scheduler.init_noise_sigma)
    x = latents[0].permute(1, 0, 2, 3).reshape(frames, -1).double()  # (frames, samples)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    corr = x @ x.T / x.shape[1]
    assert (corr - frame_covariance(frames, gamma)).abs().max() < 0.1  # 4096 samples: std ≈ 0.016
    # across window starts (every 4 frames) and past the first window's end the correlation is still γ^|m−n|
    for m, n in [(15, 16), (19, 20), (3, 5), (14, 18), (30, 31)]:
        assert abs(corr[m, n].item() - gamma ** abs(m - n)) < 0.06


def test_40_frame_run_writes_40_frames_with_windows_recorded(tmp_path, capsys):
    out = tmp_path / "long.gif"
    code = main(["generate", "--prompt", "a dog", "--frames", "40", "--steps", "1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert read_video(out).shape == (40, 64, 64, 3)
    rec = read_sidecar(out)
    assert rec["frames"] == 40 and rec["windows"]["length"] == 16 and rec["windows"]["stride"] == 4
    assert rec["windows"]["ranges"][0] == [0, 16] and rec["windows"]["ranges"][-1] == [24, 40]


def test_untiled_length_generates_padded_clip_and_keeps_requested_frames(long_pipe, monkeypatch):
    seen = capture_latents(long_pipe, monkeypatch)
    plan = plan_windows(26, None, 4, "pyramid")
    assert plan.padded_frames == 28
    video = generate_video(long_pipe, "a dog", seed=1, frames=26, height=64, width=64, steps=1, guidance=1.0, windows=plan)
    assert video.shape == (26, 64, 64, 3) and seen[0].shape[2] == 28


def test_prompt_travel_conditions_frames_before_and_after_the_boundary(long_pipe):
    seen = {}

    def grab(pipe, step, t, tensors):
        seen["embeds"] = tensors["prompt_embeds"].clone()
        return {}

    walks, runs = "a dog walks", "a dog runs"
    generate_video(
        long_pipe, walks, seed=2, frames=20, height=64, width=64, steps=1, guidance=1.0, prompt_at={12: runs},
        callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    embeds = seen["embeds"]  # (frames, tokens, dim): no CFG at guidance 1
    assert embeds.shape[0] == 20
    encode = lambda p: long_pipe.encode_prompt(p, torch.device("cpu"), 1, False)[0][0]  # noqa: E731
    a, b = encode(walks), encode(runs)
    assert not torch.allclose(a, b)
    assert torch.allclose(embeds[0], a, atol=1e-6)
    assert all(torch.allclose(embeds[f], b, atol=1e-6) for f in range(12, 20))  # from the boundary on
    assert torch.allclose(embeds[6], (a + b) / 2, atol=1e-6)  # blended in between
    assert not torch.allclose(embeds[11], embeds[12]) and not torch.allclose(embeds[0], embeds[11])


def test_short_prompt_travel_and_frame0_from_prompt_at(tmp_path):
    cfg = GenerateConfig(prompts=[], prompt_at={0: "a dog walks", 4: "a dog runs"}, frames=8, steps=1)
    [path] = generate(cfg, tmp_path / "t.gif", quiet=True)
    assert read_video(path).shape[0] == 8
    rec = read_sidecar(path)
    assert rec["prompt_at"] == {"0": "a dog walks", "4": "a dog runs"} and rec["windows"]["length"] == 8


def test_windowed_and_free_init_runs_leave_a_stock_pipeline(long_pipe):
    generate_video(long_pipe, "a dog", seed=1, frames=18, height=64, width=64, steps=1, guidance=1.0,
                   windows=plan_windows(18, None, 4, "flat"), free_init=2)
    modules = list(long_pipe.unet.modules())
    assert not any(isinstance(m, (SplitInferenceModule, FreeNoiseTransformerBlock)) for m in modules)
    assert any(isinstance(m, BasicTransformerBlock) for m in modules)
    assert not long_pipe.free_noise_enabled and not long_pipe.free_init_enabled
    # and the default path is still stock AnimateDiff, bit for bit
    parts = tiny_components()
    parts["scheduler"] = long_pipe.scheduler
    stock = AnimateDiffPipeline(**parts)
    stock.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=8, height=64, width=64, num_inference_steps=1, guidance_scale=7.5, output_type="np")
    expected = stock(prompt="a dog", generator=torch.Generator().manual_seed(5), **kwargs).frames[0]
    ours = generate_video(long_pipe, "a dog", seed=5, frames=8, height=64, width=64, steps=1, gamma=0.0)
    assert np.array_equal(ours, expected)


def test_free_init_first_iteration_starts_from_noise_prior(long_pipe, monkeypatch):
    seen = []
    original = long_pipe._apply_free_init

    def wrapped(latents, iteration, *args, **kwargs):
        seen.append((iteration, latents.detach().clone()))
        return original(latents, iteration, *args, **kwargs)

    monkeypatch.setattr(long_pipe, "_apply_free_init", wrapped)
    calls = count_unet_calls(long_pipe, monkeypatch)
    generate_video(long_pipe, "a dog", seed=3, frames=6, height=64, width=64, steps=2, guidance=1.0, gamma=0.5, free_init=3)
    prior = initial_latents(long_pipe, 1, 6, 64, 64, 0.5, torch.Generator().manual_seed(3))
    assert [i for i, _ in seen] == [0, 1, 2] and torch.equal(seen[0][1], prior)
    assert torch.equal(long_pipe._free_init_initial_noise, prior)  # what later iterations re-noise with
    assert len(calls) == 3 * 2


@pytest.mark.parametrize(
    "preset, scheduler, cls, steps, guidance, unet_calls",
    [
        ("fast", "euler-trailing", "EulerDiscreteScheduler", 4, 1.0, 4),
        ("lcm", "lcm", "LCMScheduler", 6, 1.5, 6),
        ("full", "ddim", "DDIMScheduler", 25, 7.5, 25),
    ],
)
def test_preset_wires_its_scheduler_and_steps(tmp_path, monkeypatch, preset, scheduler, cls, steps, guidance, unet_calls):
    spec = ModelSpec(base="tiny", preset=preset)
    pipe = load_pipeline(spec, device="cpu")
    calls = count_unet_calls(pipe, monkeypatch)
    [path] = generate(GenerateConfig(prompts=["a dog"], frames=2, models=spec), tmp_path / "d.gif", pipe=pipe, quiet=True)
    rec = read_sidecar(path)
    assert rec["models"]["preset"] == preset and rec["models"]["scheduler"] == scheduler
    assert rec["models"]["scheduler_config"]["class"] == cls == type(pipe.scheduler).__name__
    assert rec["steps"] == steps and rec["guidance"] == guidance and len(calls) == unet_calls
    if preset == "fast":
        assert rec["models"]["scheduler_config"]["timestep_spacing"] == "trailing"


def test_free_init_recorded_and_cli_flags_reach_the_sidecar(tmp_path, capsys):
    out = tmp_path / "f.gif"
    args = ["generate", "--prompt-at", "0:a dog walks", "--prompt-at", "6:a dog runs", "--frames", "12",
            "--context-length", "8", "--context-stride", "2", "--window-weighting", "flat", "--free-init", "2",
            "--steps", "1", "--preset", "fast", "--out", str(out), "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    rec = read_sidecar(out)
    assert rec["free_init"] == 2 and rec["steps"] == 1 and rec["models"]["preset"] == "fast"
    assert rec["windows"] == {"length": 8, "stride": 2, "weighting": "flat", "generated_frames": 12,
                              "ranges": [[0, 8], [2, 10], [4, 12]]}
    assert read_video(out).shape[0] == 12


def test_single_file_motion_adapter_loads(tmp_path):
    from safetensors.torch import save_file

    adapter = tiny_components()["motion_adapter"]
    adapter.save_config(tmp_path)
    save_file(adapter.state_dict(), tmp_path / "adapter.safetensors")
    loaded = load_motion_adapter(str(tmp_path / "adapter.safetensors"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in adapter.state_dict().items())


def test_parse_prompt_at_and_schedule():
    assert parse_prompt_at(["0:a dog walks", " 32 : a dog: runs "]) == {0: "a dog walks", 32: "a dog: runs"}
    assert prompt_schedule("a dog", {20: "a cat"}, 40) == {0: "a dog", 20: "a cat"}
    assert prompt_schedule("a dog", {0: "a fox"}, 40) == {0: "a fox"}
    for bad in (["a dog"], ["x:a dog"], ["3:"], ["-1:a dog"], ["1:a", "1:b"]):
        with pytest.raises(ValueError, match="--prompt-at"):
            parse_prompt_at(bad)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt-at", "40:a cat"], "--prompt-at"),
        (["--prompt-at", "a cat"], "--prompt-at"),
        (["--context-length", "16", "--context-stride", "17"], "--context-stride"),
        (["--context-length", "48"], "--context-length"),
        (["--context-stride", "0"], "--context-stride"),
        (["--window-weighting", "cosine"], "--window-weighting"),
        (["--free-init", "0"], "--free-init"),
        (["--preset", "turbo"], "--preset"),
        (["--preset", "fast", "--scheduler", "dpm"], "--scheduler"),
    ],
)
def test_bad_long_video_input_one_line_exit_2(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "--prompt", "a dog", "--frames", "40", "--steps", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert list(tmp_path.iterdir()) == []


def test_window_settings_checked_even_when_a_short_clip_needs_no_windows():
    for kwargs, needle in ((dict(context_stride=0), "--context-stride"), (dict(window_weighting="x"), "--window-weighting")):
        with pytest.raises(ValueError, match=needle):
            GenerateConfig(prompts=["a dog"], frames=8, **kwargs).check()
    assert GenerateConfig(prompts=["a dog"], frames=8).window_plan() is None


def test_no_prompt_at_all_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--frames", "20", "--prompt-at", "5:a cat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "frame-0 --prompt-at" in err[0] and list(tmp_path.iterdir()) == []
    assert main(["generate", "--frames", "20"]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_fast_preset_on_a_saved_model_with_a_single_file_adapter(tiny_model_dir, tmp_path):
    weights = tiny_model_dir / "motion_adapter" / "diffusion_pytorch_model.safetensors"  # config.json beside it
    spec = ModelSpec(base=str(tiny_model_dir), motion_adapter=str(weights), preset="fast")
    cfg = GenerateConfig(prompts=["a dog"], frames=2, height=64, width=64, models=spec)
    [path] = generate(cfg, tmp_path / "d.gif", device="cpu", quiet=True)
    rec = read_sidecar(path)
    assert rec["models"]["scheduler_config"] == {
        "class": "EulerDiscreteScheduler", "beta_schedule": "linear", "timestep_spacing": "trailing",
        "steps_offset": 1, "prediction_type": "epsilon",
    }
    assert rec["models"]["motion_adapter"]["source"] == "local" and rec["steps"] == 4 and rec["guidance"] == 1.0
