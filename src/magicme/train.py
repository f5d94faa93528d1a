"""The ID module (paper §4.2, §5.2): extended ID tokens trained with the masked diffusion loss.

K new tokens (`<v*>`, `<v*>_1`, … `<v*>_{K-1}`, the names stock diffusers gives a K-vector embedding)
are added to the tokenizer and text encoder, initialised from the class word's embedding. Only
their K rows are parameters: they are injected into the frozen embedding layer's output by a forward
hook, so every other weight (UNet, VAE, text encoder, the other embedding rows) gets no gradient.
The loss is ε-prediction MSE inside the subject mask, normalised per sample by the mask's area.
The result is one `.safetensors` identity file (`magicme.identity`) that stock diffusers loads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checks import MAX_SEED
from .identity import IdentityInfo, check_resume_compatible, save_identity, token_pattern
from .models import TINY, ModelSpec, load_base, pick_device, tiny_components
from .outputs import atomic_folder, check_output, check_writable, writing
from .prepare import AugmentConfig, augment, load_identity_set, read_manifest

log = logging.getLogger(__name__)

# Prompts drawn at random for each sample; "{}" becomes "<v*> dog" (the expanded tokens + class word).
TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "a close photo of the {}",
    "a good photo of the {}",
    "a bright photo of the {}",
    "a dark photo of the {}",
    "a cropped photo of the {}",
    "a rendition of a {}",
    "a photo of one {}",
    "a photo of the nice {}",
    "a photo of the cool {}",
    "a photo of the large {}",
)
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
CLIP_CONTEXT = 77  # tokens the CLIP text encoder reads, start and end included
MAX_BATCH = 1024  # a step's batch is decoded into memory at once: 1024 × 512² × 3 floats = 3 GiB
CHECKPOINT_FILES = {"identity.safetensors", "state.safetensors", "state.json", "validation.png"}


@dataclass
class TrainConfig:
    """One `magicme train` request; defaults are the paper's (§5.2) and its reference implementation's."""

    data: str | Path
    token: str = "<v*>"
    class_word: str | None = None  # None: the prepared set's
    num_vectors: int = 4  # §4.2: 4 vectors (the paper's 16 KB)
    steps: int = 200  # §5.2
    lr: float = 1e-3  # §5.2
    batch_size: int = 4  # §5.2
    micro_batch: int | None = None  # None: the whole batch at once, halved on out-of-memory (gradient accumulation)
    masked: bool = True  # §4.2 masked loss; False is the paper's "without prompt-to-segmentation" ablation
    noise_offset: float = 0.1  # reference implementation
    full_mask_share: float = 0.05  # reference implementation: share of samples trained on the whole image
    weight_decay: float = 0.01  # AdamW's usual; touches only the ID rows
    resolution: int | None = None  # None: the base model's native size (512 for SD-1.5, 64 for tiny)
    seed: int = 0
    checkpoint_every: int = 50  # steps; 0 = only on Ctrl-C
    validation_images: int = 2  # frames rendered with each checkpoint
    validation_steps: int = 25
    mixed_precision: str = "auto"  # auto: bf16 on CUDA when supported, else fp16 on CUDA; none on CPU
    out: str | Path = "id.safetensors"
    checkpoint_dir: str | Path | None = None  # None: "<out stem>-checkpoints" beside out
    resume: str | Path | None = None  # a checkpoint folder, or "latest" in checkpoint_dir
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    models: ModelSpec = field(default_factory=ModelSpec)

    def check(self) -> None:
        """Validate every argument and the inputs and outputs before any model work (ValueError naming the argument)."""
        self.check_settings()
        read_manifest(self.data)
        check_output(self.out, inputs=[("--data", self.data)] + ([("--resume", self.resume)] if self.resume not in (None, "latest") else []))
        check_checkpoint_dir(self.checkpoints())
        self.models.check()

    def check_settings(self) -> None:
        """The settings alone (no file is read): types, ranges, sizes that fit."""
        if not isinstance(self.token, str) or not self.token.strip() or any(c.isspace() for c in self.token):
            raise ValueError(f"--token must be one word without spaces such as '<v*>', got {self.token!r}")
        for name, value, low, high in (
            ("--num-vectors", self.num_vectors, 1, CLIP_CONTEXT - 3),  # start, end and the class word need a place
            ("--steps", self.steps, 1, None),
            ("--batch-size", self.batch_size, 1, MAX_BATCH),
            ("--checkpoint-every", self.checkpoint_every, 0, None),
            ("--validation-images", self.validation_images, 0, 64),
            ("--validation-steps", self.validation_steps, 1, 1000),
            ("--seed", self.seed, 0, MAX_SEED),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
                span = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{name} must be an integer {span}, got {value!r}")
        if self.micro_batch is not None and (not isinstance(self.micro_batch, int) or not 1 <= self.micro_batch <= self.batch_size):
            raise ValueError(f"--micro-batch must be in [1, --batch-size], got {self.micro_batch!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.noise_offset < 1:
            raise ValueError(f"noise_offset must be in [0, 1), got {self.noise_offset!r}")
        if not 0 <= self.full_mask_share <= 1:
            raise ValueError(f"full_mask_share must be in [0, 1], got {self.full_mask_share!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.resolution is not None and (
            not isinstance(self.resolution, int) or not 8 <= self.resolution <= 4096 or self.resolution % 8
        ):
            raise ValueError(f"--resolution must be a multiple of 8 in [8, 4096], got {self.resolution!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.class_word is not None and not self.class_word.strip():
            raise ValueError("--class-word must be a non-empty word")
        if Path(self.out).suffix != ".safetensors":
            raise ValueError(f"--out {str(self.out)!r} must end in .safetensors")

    def checkpoints(self) -> Path:
        out = Path(self.out)
        return Path(self.checkpoint_dir) if self.checkpoint_dir else out.with_name(f"{out.stem}-checkpoints")


# ---- the math ----

def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ε-MSE inside the mask (§4.2), normalised by each sample's mask area, then averaged over the batch.

    pred, target: (B, C, h, w); mask: (B, 1, h, w) in [0, 1] on the latent grid. A sample whose mask
    is empty contributes 0.
    """
    se = (pred.float() - target.float()) ** 2 * mask
    area = mask.sum(dim=(1, 2, 3)) * pred.shape[1]
    return (se.sum(dim=(1, 2, 3)) / area.clamp_min(1e-8)).mean()


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (B, H, W) pixel mask as (B, 1, h, w) on the latent grid: the share of each cell's pixels inside."""
    return F.interpolate(mask[:, None].float(), size=size, mode="area")


def offset_noise(shape: tuple[int, ...], offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise plus a per-sample, per-channel constant (`offset` × N(0, 1)): the "noise offset" trick."""
    noise = torch.randn(shape, generator=generator)
    return noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)


def expand_prompt(prompt: str, token: str, num_vectors: int) -> str:
    """'a <v*> dog' → 'a <v*> <v*>_1 … dog': the expansion stock diffusers applies for a K-vector embedding."""
    words = " ".join([token] + [f"{token}_{i}" for i in range(1, num_vectors)])
    return token_pattern(token).sub(lambda _: words, prompt)


# ---- the extended ID tokens ----

def max_num_vectors(tokenizer, class_word: str) -> int:
    """How many ID tokens fit the text encoder's context beside the longest training prompt's other words."""
    from .prepare import CLOSE_WORDS, FAR_WORDS

    others = max(
        len(tokenizer(f"{t.format(class_word)}, {w}").input_ids) for t in TEMPLATES for w in (*FAR_WORDS, *CLOSE_WORDS)
    )
    return tokenizer.model_max_length - others


class IdTokens:
    """K trainable token embeddings wired into a frozen CLIP text encoder by a forward hook."""

    def __init__(self, tokenizer, text_encoder, token: str, num_vectors: int, class_word: str):
        limit = max_num_vectors(tokenizer, class_word)
        if num_vectors > limit:
            raise ValueError(
                f"--num-vectors {num_vectors}: at most {limit} ID tokens fit the text encoder's "
                f"{tokenizer.model_max_length}-token prompts beside 'a photo of a … {class_word}'"
            )
        vocab = tokenizer.get_vocab()
        self.tokens = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
        # a word of the vocabulary (CLIP stores whole words with "</w>") would be shadowed in every prompt
        taken = [t for t in self.tokens if t in vocab or f"{t}</w>" in vocab]
        if taken:
            raise ValueError(f"--token {token!r}: {taken[0]!r} is already in the base model's vocabulary; choose another, e.g. '<{class_word[:3]}*>'")
        class_ids = tokenizer(class_word, add_special_tokens=False).input_ids
        if not class_ids:
            raise ValueError(f"--class-word {class_word!r} gives no tokens")
        tokenizer.add_tokens(self.tokens)
        self.ids = tokenizer.convert_tokens_to_ids(self.tokens)
        assert self.ids == list(range(self.ids[0], self.ids[0] + num_vectors)), "new token ids must be contiguous"
        self.first = self.ids[0]
        emb = text_encoder.get_input_embeddings()
        if emb.weight.shape[0] <= self.ids[-1]:
            text_encoder.resize_token_embeddings(self.ids[-1] + 1, mean_resizing=False)
            emb = text_encoder.get_input_embeddings()
        init = emb.weight.detach()[class_ids].float().mean(0)  # a multi-token class word: the mean of its rows
        self.embeddings = torch.nn.Parameter(init.repeat(num_vectors, 1).to(emb.weight.device))
        self.write_rows(emb)
        self.handle = emb.register_forward_hook(self._inject)

    def _inject(self, module, args, output):
        ids = args[0]
        selected = (ids >= self.first) & (ids < self.first + len(self.ids))
        rows = self.embeddings.to(output.dtype)[(ids - self.first).clamp(0, len(self.ids) - 1)]
        return torch.where(selected[..., None], rows, output)

    def write_rows(self, emb) -> None:
        """Copy the current vectors into the embedding matrix (for anything that reads it directly)."""
        with torch.no_grad():
            emb.weight[self.first : self.first + len(self.ids)] = self.embeddings.detach().to(emb.weight.dtype)

    def remove(self) -> None:
        self.handle.remove()


# ---- data ----

@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, R, R) in [-1, 1]
    masks: torch.Tensor  # (B, R, R) float in {0, 1}
    prompts: list[str]


def sample_batch(images: np.ndarray, masks: np.ndarray, cfg: TrainConfig, class_word: str, step: int) -> Batch:
    """The augmented batch of step `step`: a pure function of (seed, step), so resuming repeats it exactly."""
    rng = np.random.default_rng([cfg.seed, step])
    n = len(images)
    idx = rng.choice(n, size=cfg.batch_size, replace=n < cfg.batch_size)
    subject = f"{cfg.token} {class_word}"
    pix, msk, prompts = [], [], []
    for i in idx:
        img, mask, valid, words = augment(images[i], masks[i], rng, cfg.augment)
        whole = (not cfg.masked) or rng.random() < cfg.full_mask_share
        pix.append(img)
        msk.append(valid if whole else mask & valid)
        prompt = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(subject)
        prompts.append(f"{prompt}, {words}" if words else prompt)
    pixels = torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return Batch(pixels, torch.from_numpy(np.stack(msk)).float(), prompts)


# ---- the trainer ----

def load_training_components(spec: ModelSpec, device: torch.device, dtype: torch.dtype, base_parts: dict | None = None) -> dict:
    """vae, text_encoder, tokenizer, unet and a DDPM noise scheduler of the base model (no motion module).

    `base_parts`: components already loaded (`load_base` / `tiny_components`), used in place (moved to
    `device`); the tokenizer is copied, since training adds the ID tokens to it.
    """
    from diffusers import DDPMScheduler

    if base_parts is not None:
        parts = dict(base_parts, tokenizer=copy.deepcopy(base_parts["tokenizer"]))
    else:
        parts = tiny_components() if spec.base == TINY else load_base(spec.base, dtype=torch.float32, config=spec.base_config)
    parts.pop("motion_adapter", None)
    if spec.loras:  # optional: the identity is then learned on the LoRA'd model (frozen like the rest)
        from diffusers import StableDiffusionPipeline

        from .lora import apply_loras

        sd = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        apply_loras(sd, spec.loras)
    parts["noise_scheduler"] = DDPMScheduler.from_config(parts.pop("scheduler").config)
    for name in ("vae", "unet", "text_encoder"):
        m = parts[name]
        m.requires_grad_(False)
        m.eval()
        # frozen image models may run in half precision; the text encoder stays fp32 (gradients flow through it)
        want = dtype if name != "text_encoder" else torch.float32
        m.to(device) if m.dtype == want else m.to(device=device, dtype=want)
    return parts


def native_resolution(parts: dict) -> int:
    """The base model's training resolution: UNet sample size × VAE scale (512 for SD-1.5, 64 for tiny)."""
    return int(parts["unet"].config.sample_size) * 2 ** (len(parts["vae"].config.block_out_channels) - 1)


def autocast_dtype(device: torch.device, mixed_precision: str) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16 on CUDA; None (fp32) on CPU unless asked for."""
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


class IdTrainer:
    """Holds the models, the ID tokens, AdamW and the data; `step(k)` runs optimizer step k.

    What a backbone changes (wan_train.WanTrainer) is in `trainables`, `write_identity`, the loss and the
    validation frames; the step, micro-batching, checkpoints and resume are shared.
    """

    label = "train ID tokens"

    def __init__(self, cfg: TrainConfig, parts: dict, images: np.ndarray, masks: np.ndarray, class_word: str, device: torch.device):
        self.cfg, self.parts, self.device = cfg, parts, device
        self.images, self.masks, self.class_word = images, masks, class_word
        self.vae, self.unet, self.text_encoder = parts["vae"], parts["unet"], parts["text_encoder"]
        self.tokenizer, self.noise_scheduler = parts["tokenizer"], parts["noise_scheduler"]
        self.id_tokens = IdTokens(self.tokenizer, self.text_encoder, cfg.token, cfg.num_vectors, class_word)
        self.optimizer = torch.optim.AdamW(list(self.trainables().values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp = autocast_dtype(device, cfg.mixed_precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.micro_batch = cfg.micro_batch or cfg.batch_size
        self.step_done = 0
        self.loss_start: float | None = None  # the run's first evaluation loss, kept across --resume
        self.saved: Path | None = None  # the checkpoint of step `step_done`, once written

    @staticmethod
    def load_components(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> dict:
        return load_training_components(spec, device, dtype)

    @staticmethod
    def native_resolution(parts: dict) -> int:
        return native_resolution(parts)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def trainables(self) -> dict[str, torch.nn.Parameter]:
        """The parameters AdamW trains, by the names the checkpoint stores them under (in the optimizer's order)."""
        return {"id_embeddings": self.id_tokens.embeddings}

    def write_identity(self, path: str | Path, steps: int) -> Path:
        return save_identity(path, self.id_tokens.embeddings, self.identity_info(steps))

    def release(self) -> None:
        """Detach what training wired into the models (they may be reused)."""
        self.id_tokens.remove()

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        expanded = [expand_prompt(p, self.cfg.token, self.cfg.num_vectors) for p in prompts]
        ids = self.tokenizer(
            expanded, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def draw_noise(self, batch_size: int, resolution: int, generator: torch.Generator) -> dict:
        """All randomness of one step, per sample, drawn at once so micro-batches slice the same numbers."""
        c = self.vae.config.latent_channels
        h = resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return {
            "eps": torch.randn((batch_size, c, h, h), generator=generator),  # VAE posterior sample
            "noise": offset_noise((batch_size, c, h, h), self.cfg.noise_offset, generator),
            "t": torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator),
        }

    def batch_loss(self, batch: Batch, draws: dict) -> torch.Tensor:
        """The masked diffusion loss of one (micro-)batch, with its slice of `draw_noise`'s numbers."""
        with torch.no_grad():
            dist = self.vae.encode(batch.pixels.to(self.device, self.vae.dtype)).latent_dist
            eps = draws["eps"].to(self.device, dist.mean.dtype)
            latents = (dist.mean + dist.std * eps) * self.vae.config.scaling_factor
        noise = draws["noise"].to(self.device, latents.dtype)
        t = draws["t"].to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with self.autocast():
            cond = self.encode_prompts(batch.prompts)
            pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        mask = latent_mask(batch.masks.to(self.device), tuple(latents.shape[-2:]))
        return masked_diffusion_loss(pred, target, mask)

    def step(self, step: int) -> float:
        """Optimizer step `step` (0-based) over cfg.batch_size samples, accumulated in micro-batches."""
        batch = sample_batch(self.images, self.masks, self.cfg, self.class_word, step)
        n = len(batch.prompts)
        draws = self.draw_noise(n, batch.pixels.shape[-1], torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step))
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            try:
                total = 0.0
                for s in range(0, n, self.micro_batch):
                    part = slice(s, s + self.micro_batch)
                    micro = Batch(batch.pixels[part], batch.masks[part], batch.prompts[part])
                    loss = self.batch_loss(micro, {k: v[part] for k, v in draws.items()}) * (len(micro.prompts) / n)
                    self.scaler.scale(loss).backward()  # the batch mean, accumulated in parts
                    total += float(loss.detach())
                break
            except torch.OutOfMemoryError:
                if self.micro_batch == 1:
                    raise
                self.micro_batch = max(1, self.micro_batch // 2)
                log.warning("out of memory: accumulating gradients over micro-batches of %d", self.micro_batch)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_done = step + 1
        return total

    @torch.no_grad()
    def evaluation_loss(self, seed: int = 12345, timesteps: int = 8) -> float:
        """The loss over the whole set, unaugmented, at fixed noise and `timesteps` evenly spaced timesteps."""
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        masks = torch.from_numpy(self.masks).float() if self.cfg.masked else torch.ones(self.masks.shape)
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean * self.vae.config.scaling_factor
        mask = latent_mask(masks.to(self.device), tuple(latents.shape[-2:]))
        cond = None
        total = 0.0
        for k in range(timesteps):
            t = torch.full((len(latents),), int((k + 0.5) * self.noise_scheduler.config.num_train_timesteps / timesteps), device=self.device)
            noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
            with self.autocast():
                if cond is None:
                    cond = self.encode_prompts([TEMPLATES[0].format(f"{self.cfg.token} {self.class_word}")] * len(latents))
                pred = self.unet(self.noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
            target = self.noise_scheduler.get_velocity(latents, noise, t) if self.noise_scheduler.config.prediction_type == "v_prediction" else noise
            total += float(masked_diffusion_loss(pred, target, mask))
        return total / timesteps

    # ---- checkpoints ----

    def identity_info(self, steps: int) -> IdentityInfo:
        return IdentityInfo(
            token=self.cfg.token,
            class_word=self.class_word,
            num_vectors=self.cfg.num_vectors,
            base=self.cfg.models.base,
            steps=steps,
            hidden_size=int(self.id_tokens.embeddings.shape[1]),
            masked=self.cfg.masked,
            base_fingerprint=self.cfg.models.base_fingerprint().get("fingerprint", ""),
        )

    def state_record(self) -> dict:
        cfg = self.cfg
        return {
            "step": self.step_done,
            "loss_start": self.loss_start,
            "identity": self.identity_info(self.step_done).metadata(),
            "base": cfg.models.base_fingerprint(),
            "settings": {k: getattr(cfg, k) for k in ("seed", "lr", "batch_size", "masked", "noise_offset", "full_mask_share", "weight_decay")}
            | {"resolution": self.images.shape[1]},
        }

    def save_checkpoint(self, folder: Path, validation: bool = True, progress: bool = False) -> Path:
        """Write checkpoint folder `step-NNNNNN` atomically: identity, optimizer state, record, validation frames."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"step-{self.step_done:06d}"
        if dest.exists() and not is_checkpoint(dest):
            raise FileExistsError(f"checkpoint {str(dest)!r} exists and is not a magicme checkpoint; move it away")
        check_finite_trainables(self.trainables(), f"checkpoint {str(dest)!r}")
        with atomic_folder(dest) as tmp:
            self.write_identity(tmp / "identity.safetensors", self.step_done)
            save_file(self.state_tensors(), str(tmp / "state.safetensors"))
            record = self.state_record() | {"grad_scaler": self.scaler.state_dict()}
            (tmp / "state.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
            if validation and self.cfg.validation_images:
                self.validation_frames(progress).save(tmp / "validation.png")
        self.saved = dest
        return dest

    def _adam_prefix(self, name: str) -> str:
        return "adamw." if len(self.trainables()) == 1 else f"adamw.{name}."

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors and AdamW's moments as `state.safetensors` holds them."""
        named = self.trainables()
        tensors = {n: p.detach().cpu().contiguous() for n, p in named.items()}
        for n, p in named.items():
            state = self.optimizer.state.get(p, {})
            tensors |= {self._adam_prefix(n) + k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state.items()}
        return tensors

    def load_checkpoint(self, path: Path) -> None:
        """Restore the ID vectors, AdamW's moments and the step; refuse a checkpoint of another identity/base."""
        record, tensors = read_checkpoint(path)
        record_path = path / "state.json"
        saved = IdentityInfo.from_metadata(record["identity"], record_path)
        base = json.loads(json.dumps(self.cfg.models.base_fingerprint()))  # as the record stores it (tuples → lists)
        check_resume_compatible(record_path, saved, self.identity_info(0), record["base"], base)
        wanted = self.state_record()["settings"]
        changed = {k: (v, wanted[k]) for k, v in record["settings"].items() if wanted.get(k) != v}
        if changed:
            log.warning("--resume %s: settings differ from the checkpoint's, so the run will not match an uninterrupted one: %s", path, changed)
        self.loss_start = record.get("loss_start")
        if self.loss_start is None:  # a checkpoint from before it was kept: the vectors are still the run's start
            self.loss_start = self.evaluation_loss()
        adam = {}
        for i, (name, param) in enumerate(self.trainables().items()):
            prefix = self._adam_prefix(name)
            moments = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
            for key, t in [(name, tensors.get(name)), *((prefix + k, v) for k, v in moments.items() if k != "step")]:
                if t is None or tuple(t.shape) != tuple(param.shape):
                    got = "nothing" if t is None else f"shape {tuple(t.shape)}"
                    raise ValueError(f"--resume {str(path)!r}: state.safetensors holds {got} for {key}, expected shape {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensors[name].to(param.device))
            if moments:
                adam[i] = {k: v.to(self.device) if k != "step" else v for k, v in moments.items()}
        if adam:
            sd = self.optimizer.state_dict()
            sd["state"] = adam
            self.optimizer.load_state_dict(sd)
        if record.get("grad_scaler"):
            self.scaler.load_state_dict(record["grad_scaler"])
        self.step_done = int(record["step"])
        self.saved = path

    @torch.no_grad()
    def validation_frames(self, progress: bool = False):
        """A row of frames from the current ID tokens ('a photo of a <v*> dog'), fixed seed, as one PIL image.

        `progress` shows the rendering's denoising steps on a labelled bar (minutes on a real model)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from PIL import Image

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=not progress, leave=False, desc=f"checkpoint step {self.step_done}: validation frames")
        r = self.images.shape[1]
        with self.autocast():
            frames = pipe(
                prompt=f"a photo of a {self.cfg.token} {self.class_word}",
                num_images_per_prompt=self.cfg.validation_images,
                num_inference_steps=self.cfg.validation_steps,
                height=r,
                width=r,
                generator=torch.Generator().manual_seed(self.cfg.seed),
                output_type="np",
            ).images
        row = (np.clip(np.concatenate(list(frames), axis=1), 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(row)


@dataclass
class TrainResult:
    path: Path
    size_bytes: int
    steps: int
    loss_start: float
    loss_end: float
    checkpoint_dir: Path
    segmentation: str


def latest_checkpoint(folder: Path) -> Path:
    found = sorted(p for p in folder.glob("step-*") if is_checkpoint(p)) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {str(folder)!r}")
    return found[-1]


def is_checkpoint(path: Path) -> bool:
    """A folder `save_checkpoint` wrote: its state record, and nothing but its own files."""
    return (
        path.is_dir() and (path / "state.json").is_file()
        and all(p.name in CHECKPOINT_FILES for p in path.iterdir())
    )


def check_checkpoint_dir(folder: Path) -> None:
    """The checkpoint folder must be new, or hold only checkpoints (any step may be rewritten), and be writable."""
    if folder.exists():
        if not folder.is_dir():
            raise FileExistsError(f"checkpoint folder {str(folder)!r} is a file; move it away or choose another --out")
        foreign = [p.name for p in folder.glob("step-*") if not is_checkpoint(p)]
        if foreign:
            raise FileExistsError(f"checkpoint folder {str(folder)!r} holds {foreign[0]!r}, which is not a magicme checkpoint; move it away")
        check_writable(folder, "checkpoint folder", folder)
    else:  # made with its parents when the first checkpoint is saved
        above = next(p for p in folder.parents if p.exists())
        if not above.is_dir():
            raise FileExistsError(f"checkpoint folder {str(folder)!r}: {str(above)!r} is a file")
        check_writable(above, "checkpoint folder", folder)


def check_finite_trainables(trainables: dict[str, torch.Tensor], what: str) -> None:
    """NaN/inf vectors (a diverged run) are never written: every frame made with them would be black."""
    if not all(torch.isfinite(p).all() for p in trainables.values()):
        raise ValueError(f"{what}: the trained values are not finite (NaN/inf): training diverged; lower --lr")


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's state record and tensors, checked; a malformed one is one ValueError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "state.json").is_file() or not (path / "state.safetensors").is_file():
        raise FileNotFoundError(f"--resume {str(path)!r} is not a checkpoint folder (no state.json/state.safetensors)")
    try:
        record = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        for key, kind in (("step", int), ("identity", dict), ("base", dict), ("settings", dict)):
            if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
                raise ValueError(f"{key!r} must be a {kind.__name__}")
        if record["step"] < 1:
            raise ValueError(f"step {record['step']} is not a step a checkpoint is saved at")
        IdentityInfo.from_metadata(record["identity"], path / "state.json")
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"--resume {str(path)!r}: state.json is malformed ({e})") from None
    try:
        tensors = load_file(str(path / "state.safetensors"))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"--resume {str(path)!r}: state.safetensors is not readable ({str(e).splitlines()[0]})") from None
    emb = tensors.get("id_embeddings")
    if record["identity"].get("form", "tokens") == "tokens" and (
        emb is None or emb.ndim != 2 or emb.shape[0] != int(record["identity"].get("num_vectors", -1))
    ):
        raise ValueError(f"--resume {str(path)!r}: state.safetensors holds no ID vectors matching its state.json")
    if not all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point()):
        raise ValueError(f"--resume {str(path)!r}: state.safetensors holds NaN/inf values")
    return record, tensors


def train(
    cfg: TrainConfig, *, quiet: bool = False, device: str | None = None, step_callback=None, components: dict | None = None,
) -> TrainResult:
    """Train one identity's extended ID tokens and write `cfg.out`; Ctrl-C saves a checkpoint and re-raises.

    Ctrl-C at any point after the first step, the final loss evaluation and writing included, leaves a
    checkpoint of the last finished step; `--resume` continues it (from the last step: only what was left).

    `step_callback(step, loss)` runs after each optimizer step (a live loss curve; raising from it
    stops training with nothing written but the checkpoints already saved).
    `components`: the base model's components already loaded (vae, text_encoder, tokenizer, unet,
    scheduler; `magicme run` builds its video pipeline on them afterwards), used in place of loading
    them. The text encoder trains in fp32 as always and is handed back in its own dtype and vocabulary;
    the vae/unet should already have the dtype training picks (`autocast_dtype`, else fp32).
    """
    if components is None:
        return _train(cfg, quiet=quiet, device=device, step_callback=step_callback)
    text_encoder = components["text_encoder"]
    dtype, embeddings = text_encoder.dtype, text_encoder.get_input_embeddings()
    try:
        return _train(cfg, quiet=quiet, device=device, step_callback=step_callback, components=components)
    finally:  # training resized the embeddings for the ID tokens and ran the encoder in fp32
        text_encoder.set_input_embeddings(embeddings)
        text_encoder.config.vocab_size = embeddings.num_embeddings
        text_encoder.to(dtype=dtype)


def _train(cfg: TrainConfig, *, quiet: bool, device: str | None, step_callback, components: dict | None = None) -> TrainResult:
    from .progress import progress_bar
    from .records import absolute_paths, content_hash, dtype_name, to_jsonable
    from .video import write_sidecar

    trainer_class = IdTrainer
    if cfg.models.resolved_backbone() == "wan":
        from .wan_train import WanTrainer, wan_train_config

        cfg, trainer_class = wan_train_config(cfg), WanTrainer
    cfg.check()
    manifest = read_manifest(cfg.data)
    class_word = (cfg.class_word or manifest["class_word"]).strip()
    resume = None
    if cfg.resume is not None:
        resume = latest_checkpoint(cfg.checkpoints()) if str(cfg.resume) == "latest" else Path(cfg.resume)
        if not resume.is_dir():
            raise FileNotFoundError(f"--resume {str(resume)!r} is not a checkpoint folder")
        read_checkpoint(resume)  # a malformed checkpoint fails before any model loads
    dev = pick_device(device)
    amp = autocast_dtype(dev, cfg.mixed_precision)
    parts = (load_training_components(cfg.models, dev, amp or torch.float32, base_parts=components) if components is not None
             else trainer_class.load_components(cfg.models, dev, amp or torch.float32))
    resolution = cfg.resolution or trainer_class.native_resolution(parts)
    images, masks, _ = load_identity_set(cfg.data, resolution)
    trainer = trainer_class(cfg, parts, images, masks, class_word, dev)
    if resume is not None:
        trainer.load_checkpoint(resume)
        if trainer.step_done > cfg.steps:
            raise ValueError(f"--resume {str(resume)!r} is already at step {trainer.step_done}; raise --steps to it or above")
    if trainer.loss_start is None:
        trainer.loss_start = trainer.evaluation_loss()
    loss_start = trainer.loss_start
    ckpt_dir = cfg.checkpoints()
    bar = progress_bar(cfg.steps, trainer.label, quiet=quiet, initial=trainer.step_done)
    try:
        for step in range(trainer.step_done, cfg.steps):
            loss = trainer.step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step_callback is not None:
                step_callback(trainer.step_done, loss)
            if cfg.checkpoint_every and (trainer.step_done % cfg.checkpoint_every == 0 or trainer.step_done == cfg.steps):
                bar.set_postfix_str(f"loss={loss:.4f}, rendering the step-{trainer.step_done} checkpoint's frames")
                trainer.save_checkpoint(ckpt_dir, progress=not bar.disable)
                bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        check_finite_trainables(trainer.trainables(), f"--out {str(cfg.out)!r}")
        loss_end = trainer.evaluation_loss()
        info = trainer.identity_info(cfg.steps)
        record = {
            "task": "train",
            "identity": info.metadata(),
            "data": str(Path(cfg.data).resolve()),
            "data_sha256": content_hash(cfg.data),
            "segmentation": manifest.get("segmentation", ""),
            "loss_start": loss_start,
            "loss_end": loss_end,
            "models": {"base": cfg.models.base_fingerprint()} | cfg.models.formats_record(),
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("models", "data", "out", "checkpoint_dir", "resume")}
            | {"resolution": resolution, "class_word": class_word},
            "dtype": dtype_name(amp or torch.float32),  # what the frozen UNet/VAE ran in (the ID vectors are fp32)
            "device": str(dev),
            "config": to_jsonable(absolute_paths(replace(cfg, resume=None, checkpoint_dir=None))),  # for --from-record
        }
        with writing(cfg.out):  # a kill between the two writes leaves no record of another identity
            path = trainer.write_identity(cfg.out, cfg.steps)
            write_sidecar(path, record)
    except KeyboardInterrupt:
        bar.close()
        if trainer.step_done > 0:
            if trainer.saved is None or trainer.saved.name != f"step-{trainer.step_done:06d}":  # keep one with validation frames
                trainer.save_checkpoint(ckpt_dir, validation=False)
            print(f"magicme train: interrupted after step {trainer.step_done}; checkpoint {trainer.saved} (continue with --resume)", file=sys.stderr)
        raise
    trainer.release()
    return TrainResult(path, path.stat().st_size, cfg.steps, loss_start, loss_end, ckpt_dir, manifest.get("segmentation", ""))
