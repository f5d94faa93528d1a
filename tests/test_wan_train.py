"""The ID module on Wan: ID tokens in UMT5 and an attention LoRA, trained with the flow-matching masked loss."""

import json
import re

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from magicme.cli import main
from magicme.identity import IdentityInfo, load_identities, save_identity
from magicme.prepare import load_identity_set
from magicme.train import sample_batch, train
from magicme.wan import tiny_wan_components
from magicme.wan_identity import expand_identity_prompt, load_wan_identities
from magicme.wan_train import WanTrainConfig, WanTrainer, flow_target, load_wan_training_components, shifted_sigma

CPU = torch.device("cpu")
FAST = dict(batch_size=2, validation_steps=1, validation_images=1)


def make_trainer(prepared, **kw):
    cfg = WanTrainConfig(data=prepared, **{**FAST, **kw})
    parts = load_wan_training_components(cfg.models, CPU, torch.float32)
    images, masks, manifest = load_identity_set(prepared, 64)
    return WanTrainer(cfg, parts, images, masks, manifest["class_word"], CPU)


def stock_wan():
    pipe = WanPipeline(**tiny_wan_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flow_objective_is_what_wans_scheduler_integrates():
    unshifted = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    shifted = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    for s in (unshifted, shifted):
        s.set_timesteps(10)
    assert torch.allclose(shifted_sigma(unshifted.sigmas[:-1], 3.0), shifted.sigmas[:-1], atol=1e-6)  # σ as sampled
    assert torch.allclose(shifted.timesteps.float(), shifted.sigmas[:-1] * 1000, atol=1.0)  # the transformer sees 1000 σ
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 1, 4, 4, generator=g), torch.randn(2, 16, 1, 4, 4, generator=g)
    shifted._step_index = 3
    noisy, v = flow_target(x0, eps, shifted.sigmas[3])
    # the exact velocity makes the scheduler's own x0 estimate the clean latent
    assert torch.allclose(shifted.convert_model_output(v, sample=noisy), x0, atol=1e-5)


def test_tokens_train_only_their_rows(prepared):
    tr = make_trainer(prepared, lr=1e-2)
    emb = tr.text_encoder.get_input_embeddings()
    assert emb is tr.text_encoder.encoder.embed_tokens  # the hook sits on the module UMT5 calls
    class_row = emb.weight[tr.tokenizer("toy", add_special_tokens=False).input_ids].mean(0)
    assert torch.allclose(tr.id_tokens.embeddings, class_row.expand(4, -1))
    tr.optimizer.zero_grad()
    tr.batch_loss(sample_batch(tr.images, tr.masks, tr.cfg, "toy", 0), tr.draw_noise(2, 64, torch.Generator().manual_seed(0))).backward()
    grads = [n for m in (tr.transformer, tr.vae, tr.text_encoder) for n, p in m.named_parameters() if p.grad is not None]
    assert grads == [] and tr.id_tokens.embeddings.grad.abs().sum(1).gt(0).all()
    before = {n: p.detach().clone() for n, p in tr.transformer.named_parameters()}
    tr.step(0)
    assert all(torch.equal(before[n], p) for n, p in tr.transformer.named_parameters())
    assert tr.identity_info(1).backbone == "wan" and tr.identity_info(1).form == "tokens"


def test_token_identity_loads_by_the_readme_steps(prepared, tmp_path):
    result = train(WanTrainConfig(data=prepared, steps=2, lr=5e-2, checkpoint_every=0, out=tmp_path / "me.safetensors", **FAST), quiet=True, device="cpu")
    assert result.loss_start != result.loss_end
    # the README's steps, by hand, on a stock pipeline
    pipe = stock_wan()
    emb = load_file(str(result.path))["emb_params"]  # (K, d): d = 4096 for real Wan
    words = ["<v*>"] + [f"<v*>_{i}" for i in range(1, len(emb))]
    pipe.tokenizer.add_tokens(words)
    ids = pipe.tokenizer.convert_tokens_to_ids(words)
    table = pipe.text_encoder.get_input_embeddings()
    if max(ids) >= table.weight.shape[0]:
        pipe.text_encoder.resize_token_embeddings(max(ids) + 1)
        table = pipe.text_encoder.get_input_embeddings()
    table.weight.data[ids] = emb.to(table.weight.dtype)
    by_hand, _ = pipe.encode_prompt("a photo of a <v*> <v*>_1 <v*>_2 <v*>_3 toy", do_classifier_free_guidance=False, max_sequence_length=512)
    # magicme's loader, and the trainer that learned the vectors, see the same prompt embeddings
    ours = stock_wan()
    infos = load_wan_identities(ours, [result.path])
    loaded, _ = ours.encode_prompt(expand_identity_prompt("a photo of a <v*> toy", infos), do_classifier_free_guidance=False, max_sequence_length=512)
    assert torch.equal(by_hand, loaded)
    tr = make_trainer(prepared)
    with torch.no_grad():
        tr.id_tokens.embeddings.copy_(emb)
        trained = tr.encode_prompts(["a photo of a <v*> toy"])
    assert torch.allclose(trained, loaded, atol=1e-6)
    plain, _ = ours.encode_prompt("a photo of a toy", do_classifier_free_guidance=False, max_sequence_length=512)
    assert not torch.allclose(plain, loaded)


def test_lora_identity_loads_with_stock_load_lora_weights(prepared, tmp_path):
    tr = make_trainer(prepared, form="lora", lora_rank=4, lr=1e-2)
    trainable = {id(p) for m in (tr.transformer, tr.text_encoder, tr.vae) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in tr.trainables().values()} and len(trainable) == 2 * 2 * 4 * 2
    for k in range(2):
        tr.step(k)
    path = tr.write_identity(tmp_path / "me-lora.safetensors", 2)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    pattern = re.compile(r"^diffusion_model\.blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.lora_[AB]\.weight$")
    assert len(keys) == 2 * 2 * 4 * 2 and all(pattern.match(k) for k in keys)  # layers × attns × projections × A/B
    assert (meta["backbone"], meta["form"], meta["rank"]) == ("wan", "lora", "4")
    pipe = stock_wan()
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 32, generator=g)
    t = torch.tensor([700.0])
    with torch.no_grad():
        base = pipe.transformer(x, t, cond, return_dict=False)[0]
        pipe.load_lora_weights(str(path))  # stock diffusers, Wan's original key layout
        stock = pipe.transformer(x, t, cond, return_dict=False)[0]
        ours = tr.transformer(x, t, cond, return_dict=False)[0]
    assert torch.allclose(stock, ours, atol=1e-5) and not torch.allclose(base, ours, atol=1e-4)


def test_lora_resume_continues_exactly(prepared, tmp_path):
    common = dict(data=prepared, form="lora", lora_rank=2, lr=1e-2, checkpoint_every=2, validation_images=0, batch_size=2)
    straight = train(WanTrainConfig(steps=4, out=tmp_path / "a.safetensors", **common), quiet=True, device="cpu")
    train(WanTrainConfig(steps=2, out=tmp_path / "b.safetensors", **common), quiet=True, device="cpu")
    resumed = train(WanTrainConfig(steps=4, out=tmp_path / "b.safetensors", resume="latest", **common), quiet=True, device="cpu")
    a, b = load_file(str(straight.path)), load_file(str(resumed.path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = load_file(str(tmp_path / "b-checkpoints" / "step-000002" / "state.safetensors"))
    assert any(k.startswith("adamw.blocks.0.attn1.to_q.lora_A.weight.") for k in state)  # every LoRA tensor's moments
    with pytest.raises(ValueError, match="form"):
        train(WanTrainConfig(data=prepared, steps=4, out=tmp_path / "b.safetensors", resume="latest", checkpoint_every=2), device="cpu")


def test_identity_of_the_other_backbone_is_refused(prepared, tmp_path, tiny_pipe, capsys):
    wan_id = save_identity(tmp_path / "wan.safetensors", torch.zeros(2, 32), IdentityInfo("<w*>", "toy", 2, backbone="wan"))
    ad_id = save_identity(tmp_path / "ad.safetensors", torch.zeros(2, 32), IdentityInfo("<a*>", "toy", 2))
    with pytest.raises(ValueError, match="Wan 2.x identity"):
        load_identities(tiny_pipe, [wan_id])
    with pytest.raises(ValueError, match="AnimateDiff"):
        load_wan_identities(stock_wan(), [ad_id])
    assert main(["generate", "--identity", str(wan_id), "--prompt", "a <w*> toy", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Wan 2.x identity" in err and not (tmp_path / "x.mp4").exists()


def test_cli_train_tokens_and_lora_then_generate(prepared, tmp_path):
    for form in ("tokens", "lora"):
        out = tmp_path / f"{form}.safetensors"
        assert main(["train", "--data", str(prepared), "--backbone", "wan", "--form", form, "--lora-rank", "2", "--steps", "1",
                     "--batch-size", "1", "--checkpoint-every", "0", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
        assert json.loads(out.with_name(out.name + ".json").read_text())["identity"]["form"] == form
        clip = tmp_path / f"{form}.mp4"
        assert main(["generate", "--backbone", "wan", "--identity", str(out), "--prompt", "a <v*> toy on the beach",
                     "--frames", "5", "--steps", "1", "--height", "32", "--width", "32", "--out", str(clip), "--quiet", "--device", "cpu"]) == 0
        assert json.loads(clip.with_name(clip.name + ".json").read_text())["models"]["identities"][0]["form"] == form
    assert main(["train", "--data", str(prepared), "--form", "lora", "--out", str(tmp_path / "z.safetensors")]) == 2
