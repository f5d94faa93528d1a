"""Where every model comes from: real weights (hub id, local folder, single-file checkpoint) or the tiny preset.

The tiny preset is a complete AnimateDiff pipeline (UNet, motion adapter, VAE with the real 8× latent
scale, CLIP text encoder, CLIP BPE tokenizer) built from small configs with seeded random weights.
It generates noise, not pictures, but exercises every code path offline in about a second.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .speed import SpeedOptions, apply_speed_options

TINY = "tiny"
DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # §5.2: the ID module trains on SD-1.5
DEFAULT_MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"
SCHEDULERS = ("ddim", "euler", "dpm", "dpmpp-2m", "dpmpp-2m-karras", "lcm", "euler-trailing")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
MOTION_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# FreeU (Si et al. 2023) for SD-1.5 as its authors and diffusers' docs give them: backbone b1, b2; skip s1, s2
FREEU_SD15 = (1.5, 1.6, 0.9, 0.2)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class SpeedPreset:
    """A motion module with the scheduler, step count and guidance it was trained or distilled for."""

    name: str
    steps: int
    guidance: float
    scheduler: str | None = None  # None: ModelSpec.scheduler
    motion_adapter: str | None = None  # hub id; None: ModelSpec's default adapter
    adapter_weights: str | None = None  # one weight file in that repo (AnimateDiff-Lightning's form)
    lora: str | None = None  # spatial LoRA weight file in that repo, trained with the adapter (AnimateLCM)
    lora_scale: float = 1.0
    freeu: tuple[float, float, float, float] | None = None  # b1, b2, s1, s2
    label: str = ""  # the weights' name in messages


PRESETS = {
    "full": SpeedPreset("full", steps=25, guidance=7.5),
    # AnimateDiff-Lightning (Lin & Yang 2024): 4-step distilled adapter, Euler on trailing timesteps, no CFG
    "fast": SpeedPreset(
        "fast", steps=4, guidance=1.0, scheduler="euler-trailing", motion_adapter="ByteDance/AnimateDiff-Lightning",
        adapter_weights="animatediff_lightning_4step_diffusers.safetensors", label="AnimateDiff-Lightning",
    ),
    # AnimateLCM (Wang et al. 2024): consistency-distilled adapter + its LCM LoRA, 4–8 steps, low CFG
    "lcm": SpeedPreset(
        "lcm", steps=6, guidance=1.5, scheduler="lcm", motion_adapter="wangfuyun/AnimateLCM",
        lora="AnimateLCM_sd15_t2v_lora.safetensors", lora_scale=0.8, label="AnimateLCM",
    ),
    # The reference implementation's inference recipe (its ComfyUI workflow, Magic-Me-ComfyUI-workflow.json):
    # KSamplerAdvanced dpmpp_2m/karras, 20 steps, CFG 8; FreeU_V2 b1 1.1, b2 1.2, s1 0.9, s2 0.4; mm_sd_v15_v2
    "reference": SpeedPreset(
        "reference", steps=20, guidance=8.0, scheduler="dpmpp-2m-karras", freeu=(1.1, 1.2, 0.9, 0.4),
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """A named model could not be found locally or on the hub."""


@dataclass(frozen=True)
class TinyPreset:
    """Configs of the tiny random-weight preset (shaped like diffusers' own dummy test components)."""

    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 64)
    cross_attention_dim: int = 32
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)  # 4 blocks: the same 8× latent scale as SD
    text_layers: int = 2
    sample_size: int = 8  # latent side; 64 px
    motion_max_seq_length: int = 32

    @property
    def resolution(self) -> int:
        return self.sample_size * 2 ** (len(self.vae_channels) - 1)


def tiny_components(preset: TinyPreset = TinyPreset()) -> dict:
    """Build the tiny preset's components: vae, text_encoder, tokenizer, unet (2D), motion_adapter, scheduler."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    ch = preset.block_out_channels
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(preset.seed)
        unet = UNet2DConditionModel(
            block_out_channels=ch,
            layers_per_block=1,
            sample_size=preset.sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=preset.cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        motion_adapter = MotionAdapter(
            block_out_channels=ch,
            motion_layers_per_block=1,
            motion_norm_num_groups=8,
            motion_num_attention_heads=2,
            motion_max_seq_length=preset.motion_max_seq_length,
        )
        vae = AutoencoderKL(
            block_out_channels=preset.vae_channels,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(preset.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(preset.vae_channels),
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=preset.resolution,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=preset.cross_attention_dim,
                intermediate_size=64,
                num_hidden_layers=preset.text_layers,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for m in (unet, motion_adapter, vae, text_encoder):
        m.eval()
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=motion_adapter,
        scheduler=make_scheduler("ddim"),
    )


def sd15_components(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """SD-1.5's real configs with random weights: UNet (859 M), CLIP ViT-L/14 text encoder (123 M, 49,408-token
    vocabulary), VAE (84 M), the AnimateDiff v1.5-2 motion adapter (453 M) and a tokenizer of CLIP's size.

    For real-size runs without downloads (memory, dtypes, sizes the tiny preset cannot show). Each model is
    built and cast before the next, so the peak is about one fp32 model above the result.
    """
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(vocab_size=49408)
    builders = {
        "unet": lambda: UNet2DConditionModel(sample_size=64, cross_attention_dim=768),  # the rest is SD-1.5's default
        "motion_adapter": lambda: MotionAdapter(),  # mm_sd_v15_v2's config
        "vae": lambda: AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
        ),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )),
    }
    parts = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, build in builders.items():
            parts[name] = build().to(dtype=dtype).eval()
    return dict(parts, tokenizer=tokenizer, scheduler=make_scheduler("ddim"))


def save_tiny_model(folder: str | Path, preset: TinyPreset = TinyPreset()) -> Path:
    """Write the tiny preset as a stock diffusers Stable Diffusion folder plus `motion_adapter/`."""
    from diffusers import StableDiffusionPipeline

    from .outputs import atomic_folder, check_output

    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; choose a new folder")
    check_output(folder, arg="DIR", folder=True, owned=lambda p: False, record=False)  # only a new or empty folder
    parts = tiny_components(preset)
    adapter = parts.pop("motion_adapter")
    sd = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_folder(folder) as tmp:
        sd.save_pretrained(tmp)
        adapter.save_pretrained(tmp / "motion_adapter")
    return folder


def make_scheduler(name: str, base_config: dict | None = None):
    """A scheduler by short name, on AnimateDiff's recommended settings (linear betas, no sample clipping)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    config = dict(base_config or {})
    config.update(
        beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1, timestep_spacing="linspace"
    )
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler-trailing":  # what AnimateDiff-Lightning was distilled on
        return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if name == "lcm":  # AnimateLCM's: SD's leading spacing, linear betas
        return LCMScheduler.from_config(config, timestep_spacing="leading", clip_sample=False)
    # "dpm" is DPM++ 2M (second-order multistep DPM-Solver++), A1111's and ComfyUI's dpmpp_2m; "-karras": Karras sigmas
    return DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=name == "dpmpp-2m-karras"
    )


def scheduler_record(scheduler) -> dict:
    """The scheduler a pipeline actually holds, for the run record."""
    keys = ("beta_schedule", "timestep_spacing", "steps_offset", "prediction_type")
    out = {"class": type(scheduler).__name__, **{k: scheduler.config.get(k) for k in keys if k in scheduler.config}}
    if scheduler.config.get("use_karras_sigmas"):
        out["use_karras_sigmas"] = True
    return out


def _is_single_file(name: str) -> bool:
    return name.lower().endswith(SINGLE_FILE_SUFFIXES)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is on (huggingface_hub's reading: 1/ON/YES/TRUE, any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def weights_hint(name: str) -> str:
    """How to get hub weights `name` onto a machine that cannot download them, and what HF_HUB_OFFLINE does."""
    fetch = f"`hf download {name} --local-dir DIR` (`huggingface-cli download` on older huggingface_hub) and pass DIR"
    if hub_offline():
        return (
            "HF_HUB_OFFLINE is set, so only the local hub cache (HF_HOME) is read, and it does not hold them. "
            f"Download them once on a machine with a network: {fetch}, or `hf download {name}` to fill the cache"
        )
    return (
        f"no network, or no such repository on the hub. Download them once on a machine with a network: {fetch}; "
        "with the weights in the hub cache, HF_HUB_OFFLINE=1 loads them without trying the network"
    )


def _first_sentence(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _not_found(what: str, name: str, detail: str = "") -> ModelNotFoundError:
    example = DEFAULT_BASE if what == "base model" else DEFAULT_MOTION_ADAPTER
    if what == "base model":
        kinds = "a hub id{}, a local diffusers folder, a single-file .safetensors checkpoint, or '--base tiny' (random weights: the output is noise)"
    else:
        kinds = ("a hub id{}, a local folder saved with MotionAdapter.save_pretrained, or a motion-module file "
                 "(AnimateDiff's mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt, a .safetensors copy)")
    hint = "Give " + kinds.format(f" (e.g. {example!r})" if example != name else "") + "."  # never the id that failed
    return ModelNotFoundError(f"{what} {name!r} not found{': ' + detail if detail else ''}. {hint}")


def _resolve(what: str, name: str) -> tuple[str, bool]:
    """Return (name, is_local). A string that is neither an existing path nor an `owner/name` id fails here."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path), True
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")) and not name.lower().endswith(MOTION_FILE_SUFFIXES):
        return name, False
    raise _not_found(what, name, "no such file or folder")


def _from_pretrained(cls, what: str, name: str, **kwargs):
    """`cls.from_pretrained` with hub/IO failures turned into one clear error."""
    name, is_local = _resolve(what, name)
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # hub errors subclass OSError; unreadable configs raise ValueError
        if is_local:
            raise _not_found(what, name, f"the local folder is not a readable diffusers model ({_first_sentence(e)})") from None
        detail = "" if hub_offline() else f" ({_first_sentence(e)})"  # offline, the library's words add nothing
        raise ModelNotFoundError(f"{what} {name!r} is not reachable on the hub{detail}: {weights_hint(name)}") from None


def load_motion_adapter(name: str, dtype: torch.dtype | None = None, weights: str | None = None):
    """A MotionAdapter from a diffusers folder or hub id, or from one weight file.

    A file (`.ckpt`, `.safetensors` …; or `weights`, a file inside hub repo `name`) holds only the
    adapter's tensors, in AnimateDiff's original layout or diffusers' (see `motion.py`): the config is
    the `config.json` beside a local file, else read off the tensors.
    """
    from diffusers import MotionAdapter

    from .motion import load_motion_file

    if weights is None and not name.lower().endswith(MOTION_FILE_SUFFIXES):
        return _from_pretrained(MotionAdapter, "motion adapter", name, dtype=dtype)
    if weights is None:
        path = Path(name).expanduser()
        if not path.is_file():
            raise _not_found("motion adapter", name, "no such weight file")
        config = path.with_name("config.json")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name, weights))
        except Exception as e:  # offline, missing repo or file: hub errors are of several kinds
            raise ModelNotFoundError(
                f"motion adapter {name!r} (file {weights!r}) is not reachable on the hub ({type(e).__name__}): {weights_hint(name)}"
            ) from None
        config = None
    adapter = load_motion_file(path, config)
    return adapter.to(dtype=dtype) if dtype is not None else adapter


def load_base(name: str, dtype: torch.dtype | None = None, config: str | None = None) -> dict:
    """Components of an SD-1.5-family model: a hub id, a diffusers folder, or a single-file checkpoint.

    A single-file checkpoint (the Civitai form) is converted by diffusers; `config` names the diffusers
    folder or hub id whose configs describe it (default: SD-1.5's, which needs the hub once).
    """
    from diffusers import StableDiffusionPipeline

    kwargs = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if _is_single_file(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise _not_found("base model", name, "no such checkpoint file")
        cfg = config or DEFAULT_BASE
        try:
            sd = StableDiffusionPipeline.from_single_file(str(path), config=cfg, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"--base {name!r}: could not read the checkpoint with configs from {cfg!r} ({first}). "
                "Pass --base-config with a local diffusers SD-1.5 folder when offline."
            ) from None
    else:
        sd = _from_pretrained(StableDiffusionPipeline, "base model", name, **kwargs)
    return dict(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet, scheduler=sd.scheduler)


@dataclass(frozen=True)
class ModelSpec:
    """Which models to load: `base` is 'tiny', a hub id, a diffusers folder or a .safetensors file."""

    base: str = TINY
    motion_adapter: str | None = None  # None: the base folder's motion_adapter/, else the AnimateDiff v1.5-2 adapter
    base_config: str | None = None  # configs for a single-file base
    scheduler: str = "ddim"
    preset: str = "full"  # "fast"/"lcm": a few-step adapter with its own scheduler; "reference" (see PRESETS)
    speed: SpeedOptions = SpeedOptions()  # dtype, low-VRAM set, torch.compile (speed.py)
    loras: tuple[str, ...] = ()  # "FILE[:SCALE]": kohya/A1111 or diffusers LoRAs of the image model (lora.py)
    motion_loras: tuple[str, ...] = ()  # "FILE[:SCALE]": AnimateDiff motion LoRAs
    # b1, b2, s1, s2; True: SD1.5's values; None: the preset's (off for most)
    freeu: tuple[float, float, float, float] | bool | None = None
    clip_skip: int = 0  # text-encoder layers skipped at the end (diffusers' clip_skip: 1 = A1111's "Clip skip 2")
    backbone: str = "auto"  # "animatediff", "wan", or "auto": from the base model's files (wan.py)

    def __post_init__(self):
        # config files and the UI give lists; the spec is a cache key, so it holds tuples
        for name in ("loras", "motion_loras"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value or ()))
        if self.freeu is True:
            object.__setattr__(self, "freeu", FREEU_SD15)
        elif self.freeu is False:
            object.__setattr__(self, "freeu", None)
        elif self.freeu is not None and not isinstance(self.freeu, str):
            object.__setattr__(self, "freeu", tuple(self.freeu))

    def resolved_backbone(self) -> str:
        """'animatediff' or 'wan': as given, else read from the base model's `model_index.json`."""
        from .wan import BACKBONES, detect_backbone

        if self.backbone not in BACKBONES:
            raise ValueError(f"--backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        return detect_backbone(self.base) if self.backbone == "auto" else self.backbone

    def base_fingerprint(self) -> dict:
        """`fingerprint(base)`, telling the two tiny presets apart."""
        if self.base == TINY and self.resolved_backbone() == "wan":
            from .wan import tiny_wan_fingerprint

            return tiny_wan_fingerprint()
        return fingerprint(self.base)

    def check(self) -> None:
        self.speed.check()
        if self.resolved_backbone() == "wan":
            from .wan import check_wan_spec

            self.speed.check_wan()
            return check_wan_spec(self)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.freeu is not None and (
            isinstance(self.freeu, str) or len(self.freeu) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in self.freeu)
        ):
            raise ValueError(f"--freeu takes four numbers >= 0 (b1,b2,s1,s2, e.g. {','.join(map(str, FREEU_SD15))}), got {self.freeu!r}")
        if not isinstance(self.clip_skip, int) or isinstance(self.clip_skip, bool) or self.clip_skip < 0:
            raise ValueError(f"--clip-skip must be an integer >= 0, got {self.clip_skip!r}")
        if (PRESETS[self.preset].lora and self.base != TINY) or self.loras or self.motion_loras:
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise ValueError("LoRAs (--lora, --motion-lora, --preset lcm) need peft: pip install 'magicme[lora]'")
        from .lora import check_lora_entries

        check_lora_entries(self.loras, "--lora")
        check_lora_entries(self.motion_loras, "--motion-lora")
        if self.base == TINY:
            if self.motion_adapter not in (None, TINY):
                raise ValueError("--motion-adapter cannot be combined with --base tiny (the preset has its own)")
            return
        if _is_single_file(self.base):
            if not Path(self.base).expanduser().is_file():
                raise _not_found("base model", self.base, "no such checkpoint file")
        else:
            _resolve("base model", self.base)
        if self.motion_adapter not in (None, TINY):
            _resolve("motion adapter", self.motion_adapter)

    def scheduler_name(self) -> str:
        """The preset's scheduler (a few-step adapter only works with the one it was distilled on), else ours."""
        return PRESETS[self.preset].scheduler or self.scheduler

    def adapter_weights(self) -> str | None:
        """A weight file inside the preset's hub repo, when the adapter is the preset's own."""
        return PRESETS[self.preset].adapter_weights if self.motion_adapter in (None, TINY) else None

    def adapter_name(self) -> str:
        if self.motion_adapter not in (None, TINY):
            return self.motion_adapter
        if PRESETS[self.preset].motion_adapter:
            return PRESETS[self.preset].motion_adapter
        local = Path(self.base).expanduser() / "motion_adapter"
        return str(local) if local.is_dir() else DEFAULT_MOTION_ADAPTER

    def freeu_values(self) -> tuple[float, float, float, float] | None:
        """FreeU's (b1, b2, s1, s2): the user's, else the preset's, else None (off)."""
        return self.freeu if self.freeu is not None else PRESETS[self.preset].freeu

    def formats_record(self) -> dict:
        """The run record's entries for LoRAs (with fingerprints), FreeU and clip skip, where set."""
        from .lora import lora_record

        out = lora_record(self.loras, self.motion_loras)
        if self.freeu_values():
            out["freeu"] = dict(zip(("b1", "b2", "s1", "s2"), self.freeu_values()))
        if self.clip_skip:
            out["clip_skip"] = self.clip_skip
        return out

    def max_frames(self) -> int | None:
        """The motion module's maximum frames (its config's motion_max_seq_length) where readable without loading."""
        if self.base == TINY:
            return TinyPreset().motion_max_seq_length
        if self.adapter_weights():
            return None
        path = Path(self.adapter_name()).expanduser()
        config = path / "config.json" if path.is_dir() else path.with_name("config.json") if path.is_file() else None
        if config is not None and config.is_file():
            import json

            return int(json.loads(config.read_text()).get("motion_max_seq_length", 32))
        return None

    def check_frames(self, frames: int, flag: str) -> None:
        """Refuse more frames in one motion-module pass than the module was built for, where its config is local."""
        check_motion_frames(frames, self.max_frames(), flag)


def check_motion_frames(frames: int, maximum: int | None, flag: str) -> None:
    """A motion module attends over at most `maximum` frames (motion_max_seq_length: its positional table)."""
    if maximum is not None and frames > maximum:
        raise ValueError(f"{flag} {frames} is above the motion module's maximum of {maximum} frames; use at most {maximum}")


def native_resolution(spec: ModelSpec, pipe=None) -> int:
    """The side in px the base model was trained at: UNet sample_size × VAE scale (SD-1.5 512, SD-2 768, tiny 64).

    Read from `pipe` when it is loaded, else from the base's configs (no weights are read; a single-file
    checkpoint is described by `base_config`, as `load_base` does).
    """
    if pipe is not None:
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    if spec.base == TINY:
        return TinyPreset().resolution
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source = (spec.base_config or DEFAULT_BASE) if _is_single_file(spec.base) else spec.base
    name, is_local = _resolve("base model", source)
    try:
        unet = UNet2DConditionModel.load_config(name, subfolder="unet")
        vae = AutoencoderKL.load_config(name, subfolder="vae")
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "the local folder is not a readable diffusers model" if is_local else "not reachable on the hub"
        raise _not_found("base model", source, f"{where} ({first})") from None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` checked to exist on this machine (ValueError naming it otherwise); None: CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {str(device)!r} is not a device; use cpu, cuda, cuda:1, mps …") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"--device {str(device)!r}: magicme runs on {', '.join(DEVICE_TYPES)}")
    if dev.type == "cpu":
        return dev
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type)
    if not backend.is_available():
        raise ValueError(f"--device {str(device)!r}: no {dev.type.upper()} device on this machine; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"--device {str(device)!r}: this machine has {count} {dev.type} device(s), numbered from 0")
    return dev


def load_pipeline(
    spec: ModelSpec, device: str | torch.device | None = None, dtype: torch.dtype | None = None, base_parts: dict | None = None,
):
    """An `AnimateDiffPipeline` for `spec`, on `device` (default: CUDA when available).

    `base_parts`: the base model's components already loaded (`load_base` / `tiny_components`), built on
    instead of loading them again (`magicme run` trains on them first). A Wan spec gives a `WanPipeline`.
    """
    if spec.resolved_backbone() == "wan":
        from .wan import load_wan_pipeline

        return load_wan_pipeline(spec, device, dtype)
    spec.check()
    device = pick_device(device)
    dtype = dtype or spec.speed.torch_dtype(device)
    preset = PRESETS[spec.preset]
    if base_parts is not None:
        parts = dict(base_parts)
    elif spec.base == TINY:
        parts = tiny_components()
    else:
        parts = load_base(spec.base, dtype=dtype, config=spec.base_config)
    if spec.base != TINY:
        try:
            parts["motion_adapter"] = load_motion_adapter(spec.adapter_name(), dtype=dtype, weights=spec.adapter_weights())
        except ModelNotFoundError as e:
            if spec.motion_adapter is None and preset.motion_adapter:
                raise _preset_missing(preset, preset.motion_adapter + (f"/{preset.adapter_weights}" if preset.adapter_weights else "")) from None
            raise e from None
    return apply_speed_options(assemble_pipeline(parts, spec, dtype), spec.speed, device)


def assemble_pipeline(parts: dict, spec: ModelSpec, dtype: torch.dtype):
    """Components (vae, text_encoder, tokenizer, 2D unet, motion_adapter, scheduler; consumed) → the pipeline of `spec`:
    its scheduler, the preset's and the user's LoRAs, clip skip and FreeU, in `dtype`, on the components' device."""
    from diffusers import AnimateDiffPipeline, UNetMotionModel

    from .lora import apply_loras
    from .motion import check_adapter_fits

    preset = PRESETS[spec.preset]
    check_adapter_fits(parts["motion_adapter"], parts["unet"], spec.adapter_name())
    parts["scheduler"] = make_scheduler(spec.scheduler_name(), dict(parts["scheduler"].config))
    adapter = parts.pop("motion_adapter")
    with default_dtype(dtype):  # from_unet2d builds in the default dtype: an fp32 copy of SD-1.5's would be 5 GB more
        parts["unet"] = UNetMotionModel.from_unet2d(parts.pop("unet"), adapter)
    share_motion_modules(adapter, parts["unet"])
    pipe = AnimateDiffPipeline(**parts, motion_adapter=adapter)
    parts.clear()
    preset_lora = None
    if preset.lora and spec.base != TINY:  # the tiny preset keeps its own random adapter and no LoRA
        load_preset_lora(pipe, spec, preset)
        preset_lora = (preset.name, preset.lora_scale)
    apply_loras(pipe, spec.loras, spec.motion_loras, preset=preset_lora)
    if spec.clip_skip:
        skip_text_layers(pipe.text_encoder, spec.clip_skip)
    if spec.freeu_values():
        b1, b2, s1, s2 = spec.freeu_values()
        pipe.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    if pipe.unet.dtype != dtype or spec.loras or spec.motion_loras:  # tiny is built in fp32; LoRA layers load in theirs
        pipe.to(dtype=dtype)
    return pipe


def share_motion_modules(adapter, unet) -> None:
    """Point the adapter at the UNet's motion modules: from_unet2d copied them, and the pipeline keeps the adapter
    (FreeNoise reads its config), so two copies would stay in memory (0.9 GB in fp16 for SD-1.5)."""
    for mine, theirs in zip(adapter.down_blocks, unet.down_blocks):
        mine.motion_modules = theirs.motion_modules
    for mine, theirs in zip(adapter.up_blocks, unet.up_blocks):
        mine.motion_modules = theirs.motion_modules
    if getattr(adapter, "mid_block", None) is not None:
        adapter.mid_block.motion_modules = unet.mid_block.motion_modules


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Tensors created inside are `dtype` (floating types only); the previous default comes back after."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _preset_missing(preset: SpeedPreset, what: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"--preset {preset.name} needs the {preset.label} weights {what!r}, which are not on this machine and the hub "
        f"is not reachable: run once online to cache them, or pass --motion-adapter with a local copy of {preset.label}'s motion module"
    )


def load_preset_lora(pipe, spec: ModelSpec, preset: SpeedPreset) -> None:
    """The preset's LoRA (AnimateLCM's): beside a local --motion-adapter when there, else from the preset's hub repo."""
    local = Path(spec.adapter_name()).expanduser()
    folder = local if local.is_dir() else local.parent if local.is_file() else None
    if folder is not None and (folder / preset.lora).is_file():
        source = str(folder / preset.lora)
        pipe.load_lora_weights(source, adapter_name=preset.name)
        return
    try:
        pipe.load_lora_weights(preset.motion_adapter, weight_name=preset.lora, adapter_name=preset.name)
    except OSError:  # offline or absent: hub errors subclass OSError
        raise _preset_missing(preset, f"{preset.motion_adapter}/{preset.lora}") from None


def skip_text_layers(text_encoder, n: int) -> None:
    """Drop the text encoder's last `n` layers: its output is then layer −(n+1), final-norm'd (diffusers' clip_skip)."""
    encoder = getattr(text_encoder, "text_model", text_encoder).encoder  # transformers 5 dropped `text_model`
    layers = encoder.layers
    if n >= len(layers):
        raise ValueError(f"--clip-skip {n}: the text encoder has only {len(layers)} layers")
    encoder.layers = layers[: len(layers) - n]
    text_encoder.config.num_hidden_layers = len(layers) - n


def fingerprint(name: str) -> dict:
    """Identify a model for the run record: hub id, or a hash of a local file/folder's weight files.

    Local weights are hashed over each file's name, size, and first and last MiB: a few ms for GBs,
    and any re-save or edit of the weights changes it.
    """
    if name == TINY:
        return {"name": TINY, "preset": TinyPreset().__dict__ | {"resolution": TinyPreset().resolution}}
    path = Path(name).expanduser()
    if not path.exists():
        return {"name": name, "source": "hub"}
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json")
    )
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return {"name": str(path.resolve()), "source": "local", "fingerprint": h.hexdigest()[:16]}
