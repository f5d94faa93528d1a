"""The ID module on Wan 2.x (§4.2 on a flow-matching video transformer), trained on single images as one-frame videos.

Two forms (wan_identity.py has the files):
- `tokens`: the paper's extended ID tokens — K new rows of UMT5's input embedding, only those trained;
- `lora`: a LoRA (peft) on the transformer's self- and cross-attention projections, the form Wan users share.

Everything else is `train.py`'s: the augmented batches, the masked loss (normalised by mask area), micro-batches,
AdamW, checkpoints and resume (`IdTrainer`). What differs is the objective. Wan is a rectified flow: a clean
latent x0 and noise ε give x_σ = (1 − σ) x0 + σ ε, and the transformer predicts the velocity v = ε − x0 at
timestep 1000 σ (what Wan's flow-matching schedulers integrate). σ is drawn as the sampler visits it: u ~ U(0, 1)
shifted by the model's flow shift s, σ = s u / (1 + (s − 1) u). A photo is a video of one frame: the causal VAE
encodes frame 0 alone, to one latent frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from .identity import IdentityInfo, save_identity
from .models import TINY, ModelSpec
from .train import IdTokens, IdTrainer, TrainConfig, TEMPLATES, expand_prompt, latent_mask, masked_diffusion_loss, offset_noise
from .wan import TinyWanPreset, WanDefaults, encode_wan_video, flow_shift, tiny_wan_components
from .wan_identity import LORA_TARGETS, require_peft, save_wan_lora

FORMS = ("tokens", "lora")
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default prompt length: train on the embeddings it will see


@dataclass
class WanTrainConfig(TrainConfig):
    """`TrainConfig` for the Wan backbone: the form of the identity and its own learning rate."""

    form: str = "tokens"  # "tokens": extended ID tokens in UMT5 (§4.2); "lora": masked-loss LoRA on attention
    lora_rank: int = 16  # alpha = rank: the file loads at scale 1 everywhere
    lr: float | None = None  # None: 1e-3 for tokens (§5.2), 1e-4 for a LoRA
    noise_offset: float = 0.0  # the offset trick is SD's; Wan trains on plain Gaussian noise
    models: ModelSpec = field(default_factory=lambda: ModelSpec(backbone="wan"))

    def __post_init__(self):
        if self.lr is None:
            self.lr = 1e-3 if self.form == "tokens" else 1e-4
        if self.models.backbone == "auto":
            self.models = replace(self.models, backbone="wan")

    def check(self) -> None:
        if self.resolution is not None and self.resolution % 16:
            raise ValueError(f"--resolution must be a multiple of 16 for Wan (VAE 8× × patch 2), got {self.resolution!r}")
        if self.form not in FORMS:
            raise ValueError(f"--form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 1:
            raise ValueError(f"--lora-rank must be an integer >= 1, got {self.lora_rank!r}")
        if self.form == "lora":
            require_peft("--form lora")
        super().check()


def wan_train_config(cfg: TrainConfig) -> WanTrainConfig:
    """A `TrainConfig` whose model is Wan, as a `WanTrainConfig` (same values; form tokens unless it says)."""
    if isinstance(cfg, WanTrainConfig):
        return cfg
    return WanTrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})


def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ = s u / (1 + (s − 1) u): the flow shift Wan's schedulers apply to their sigmas (s = 1: σ = u)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_σ, v): the rectified-flow point x_σ = (1 − σ) x0 + σ ε and its velocity v = ε − x0."""
    return (1 - sigma) * x0 + sigma * noise, noise - x0


def load_wan_training_components(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> dict:
    """tokenizer, text_encoder, vae (fp32), transformer (`dtype`) and scheduler of a Wan T2V model, frozen."""
    if spec.base == TINY:
        parts = tiny_wan_components() | {"resolution": TinyWanPreset().resolution}
    else:
        from .wan import load_wan_pipeline

        pipe = load_wan_pipeline(spec, device="cpu", dtype=dtype)
        if pipe.transformer_2 is not None:
            raise ValueError(
                f"--base {spec.base!r} has two expert transformers (Wan 2.2 A14B); training an identity on it is not "
                "supported yet: train on Wan 2.1 T2V or Wan 2.2 TI2V-5B"
            )
        parts = {k: getattr(pipe, k) for k in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}
        parts["resolution"] = WanDefaults().height  # square crops at the side Wan 2.1 was trained at (480p)
    # UMT5 calls encoder.embed_tokens, a module that only shares its weight with get_input_embeddings():
    # make them one module so the ID-token hook on the input embedding sees every prompt
    parts["text_encoder"].set_input_embeddings(parts["text_encoder"].get_input_embeddings())
    for name in ("vae", "transformer", "text_encoder"):
        m = parts[name]
        m.requires_grad_(False)
        m.eval()
        want = torch.float32 if name == "vae" else dtype
        m.to(device) if m.dtype == want else m.to(device=device, dtype=want)
    return parts


class WanTrainer(IdTrainer):
    """`IdTrainer` on a Wan transformer: ID tokens in UMT5 or a LoRA on attention, flow-matching masked loss."""

    def __init__(self, cfg: WanTrainConfig, parts: dict, images: np.ndarray, masks: np.ndarray, class_word: str, device: torch.device):
        from .train import autocast_dtype

        self.cfg, self.parts, self.device = cfg, parts, device
        self.images, self.masks, self.class_word = images, masks, class_word
        self.vae, self.text_encoder, self.tokenizer = parts["vae"], parts["text_encoder"], parts["tokenizer"]
        self.transformer, self.scheduler = parts["transformer"], parts["scheduler"]
        self.shift = flow_shift(self.scheduler)
        self.id_tokens, self.lora = None, {}
        if cfg.form == "tokens":
            self.id_tokens = IdTokens(self.tokenizer, self.text_encoder, cfg.token, cfg.num_vectors, class_word)
        else:
            self.lora = add_attention_lora(self.transformer, cfg.lora_rank, cfg.seed)
        self.label = f"train Wan {'ID tokens' if cfg.form == 'tokens' else 'LoRA'}"
        self.pipe = self.prompt_pipe()
        self.optimizer = torch.optim.AdamW(list(self.trainables().values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp = autocast_dtype(device, cfg.mixed_precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.micro_batch = cfg.micro_batch or cfg.batch_size
        self.step_done = 0
        self.loss_start: float | None = None
        self.saved: Path | None = None

    load_components = staticmethod(load_wan_training_components)

    @staticmethod
    def native_resolution(parts: dict) -> int:
        return parts["resolution"]

    # ---- what the identity is ----

    def trainables(self) -> dict[str, torch.nn.Parameter]:
        return super().trainables() if self.id_tokens is not None else self.lora

    def identity_info(self, steps: int) -> IdentityInfo:
        tokens = self.id_tokens is not None
        return IdentityInfo(
            token=self.cfg.token,
            class_word=self.class_word,
            num_vectors=self.cfg.num_vectors if tokens else 0,
            base=self.cfg.models.base,
            steps=steps,
            hidden_size=int(self.id_tokens.embeddings.shape[1]) if tokens else int(self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim),
            masked=self.cfg.masked,
            backbone="wan",
            form=self.cfg.form,
            rank=0 if tokens else self.cfg.lora_rank,
        )

    def write_identity(self, path: str | Path, steps: int) -> Path:
        if self.id_tokens is not None:
            return save_identity(path, self.id_tokens.embeddings, self.identity_info(steps))
        return save_wan_lora(path, self.lora, self.identity_info(steps))

    def release(self) -> None:
        if self.id_tokens is not None:
            self.id_tokens.remove()
        else:
            self.transformer.delete_adapters("identity")

    # ---- the loss ----

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings exactly as `WanPipeline.encode_prompt` makes them (padding zeroed), with the ID words expanded."""
        if self.id_tokens is not None:
            prompts = [expand_prompt(p, self.cfg.token, self.cfg.num_vectors) for p in prompts]
        with torch.set_grad_enabled(self.id_tokens is not None and torch.is_grad_enabled()):  # a LoRA needs no text gradient
            embeds, _ = self.pipe.encode_prompt(
                prompts, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH, device=self.device,
                dtype=self.transformer.dtype,
            )
        return embeds

    def prompt_pipe(self):
        """A `WanPipeline` over the same modules (no copies), for its prompt encoding and validation frames."""
        from diffusers import WanPipeline

        return WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae, transformer=self.transformer, scheduler=self.scheduler)

    def draw_noise(self, batch_size: int, resolution: int, generator: torch.Generator) -> dict:
        """All randomness of one step, per sample: VAE posterior sample, flow noise, σ's uniform draw."""
        c, h = self.vae.config.z_dim, resolution // self.vae.config.scale_factor_spatial
        return {
            "eps": torch.randn((batch_size, c, h, h), generator=generator),
            "noise": offset_noise((batch_size, c, h, h), self.cfg.noise_offset, generator),
            "u": torch.rand((batch_size,), generator=generator),
        }

    def flow_loss(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked velocity MSE at σ = shift(u), on one-frame latents x0 (B, C, 1, h, w)."""
        sigma = shifted_sigma(u.to(self.device, x0.dtype), self.shift)
        noisy, target = flow_target(x0, noise, sigma.view(-1, 1, 1, 1, 1))
        t = sigma * self.scheduler.config.num_train_timesteps
        with self.autocast():
            pred = self.transformer(
                hidden_states=noisy.to(self.transformer.dtype), timestep=t, encoder_hidden_states=cond, return_dict=False
            )[0]
        return masked_diffusion_loss(pred[:, :, 0], target[:, :, 0], mask)

    def batch_loss(self, batch, draws: dict) -> torch.Tensor:
        with torch.no_grad():
            x0 = encode_wan_video(self.vae, batch.pixels[:, :, None], draws["eps"][:, :, None]).float()
        noise = draws["noise"][:, :, None].to(self.device, x0.dtype)
        with self.autocast():
            cond = self.encode_prompts(batch.prompts)
        mask = latent_mask(batch.masks.to(self.device), tuple(x0.shape[-2:]))
        return self.flow_loss(x0, noise, draws["u"], cond, mask)

    @torch.no_grad()
    def evaluation_loss(self, seed: int = 12345, timesteps: int = 8) -> float:
        """The loss over the whole set, unaugmented, at fixed noise and `timesteps` evenly spaced u."""
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        masks = torch.from_numpy(self.masks).float() if self.cfg.masked else torch.ones(self.masks.shape)
        x0 = encode_wan_video(self.vae, pixels[:, :, None]).float()
        mask = latent_mask(masks.to(self.device), tuple(x0.shape[-2:]))
        with self.autocast():
            cond = self.encode_prompts([TEMPLATES[0].format(f"{self.cfg.token} {self.class_word}")] * len(x0))
        total = 0.0
        for k in range(timesteps):
            u = torch.full((len(x0),), (k + 0.5) / timesteps)
            noise = torch.randn(x0.shape, generator=generator).to(self.device, x0.dtype)
            total += float(self.flow_loss(x0, noise, u, cond, mask))
        return total / timesteps

    @torch.no_grad()
    def validation_frames(self, progress: bool = False):
        """A row of one-frame videos from the current identity ('a photo of a <v*> dog'), fixed seed, as one PIL image.

        `progress` shows the rendering's denoising steps (as `Trainer.validation_frames`, which checkpoints call)."""
        from PIL import Image

        pipe = self.pipe
        pipe.set_progress_bar_config(disable=not progress, desc="checkpoint preview", leave=False)
        prompt = f"a photo of a {self.cfg.token} {self.class_word}"
        if self.id_tokens is not None:
            prompt = expand_prompt(prompt, self.cfg.token, self.cfg.num_vectors)
        r = self.images.shape[1]
        with self.autocast():
            frames = pipe(
                prompt=prompt, num_videos_per_prompt=self.cfg.validation_images, num_frames=1, height=r, width=r,
                num_inference_steps=self.cfg.validation_steps, generator=torch.Generator().manual_seed(self.cfg.seed),
                output_type="np",
            ).frames[:, 0]
        row = (np.clip(np.concatenate(list(frames), axis=1), 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(row)


def add_attention_lora(transformer, rank: int, seed: int) -> dict[str, torch.nn.Parameter]:
    """A peft LoRA (alpha = rank, B = 0 so it starts as the base model) on every attention projection, seeded.

    Returns its parameters by diffusers' names (`blocks.0.attn1.to_q.lora_A.weight`).
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    with torch.random.fork_rng(devices=[]):  # A's random init from the run's seed, the caller's RNG untouched
        torch.manual_seed(seed)
        transformer.add_adapter(config, adapter_name="identity")
    params = {}
    for name, p in transformer.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
            params[name.replace(".identity.", ".")] = p
    return params
