import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from magicme.cli import main
from magicme.identity import IdentityInfo, load_identities, read_identity, save_identity
from magicme.models import ModelSpec, tiny_components
from magicme.prepare import load_identity_set
from magicme.train import (
    IdTrainer,
    TrainConfig,
    expand_prompt,
    latent_mask,
    load_training_components,
    masked_diffusion_loss,
    sample_batch,
    train,
)

CPU = torch.device("cpu")


def make_trainer(prepared, **kw):
    cfg = TrainConfig(data=prepared, **{"batch_size": 2, "validation_steps": 2, **kw})
    parts = load_training_components(ModelSpec(), CPU, torch.float32)
    images, masks, manifest = load_identity_set(prepared, 64)
    return IdTrainer(cfg, parts, images, masks, manifest["class_word"], CPU)


def stock_sd(parts=None):
    parts = parts or tiny_components()
    parts.pop("motion_adapter")
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_masked_loss_ignores_everything_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ones = torch.ones(3, 1, 8, 8)
    assert torch.allclose(masked_diffusion_loss(pred, target, ones), torch.nn.functional.mse_loss(pred, target))
    mask = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    p1 = pred.clone().requires_grad_(True)
    l1 = masked_diffusion_loss(p1, target, mask)
    l1.backward()
    outside = (mask == 0).expand_as(pred)
    p2 = torch.where(outside, pred + 5 * torch.randn(pred.shape, generator=g), pred).requires_grad_(True)
    t2 = torch.where(outside, target - 3, target)
    l2 = masked_diffusion_loss(p2, t2, mask)
    l2.backward()
    assert torch.equal(l1, l2) and torch.equal(p1.grad, p2.grad)  # changed outside: same loss, same gradient
    assert (p1.grad[outside] == 0).all() and (p1.grad[~outside] != 0).any()
    # normalised by each sample's mask area: a constant error gives the same loss for any mask size
    small, big = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    small[..., :2, :2] = 1
    err = torch.full((1, 4, 8, 8), 0.5)
    assert masked_diffusion_loss(err, torch.zeros_like(err), small) == masked_diffusion_loss(err, torch.zeros_like(err), big) == 0.25
    assert masked_diffusion_loss(err, torch.zeros_like(err), torch.zeros(1, 1, 8, 8)) == 0  # empty mask: no loss
    m = torch.zeros(1, 64, 64)
    m[:, :32] = 1
    lm = latent_mask(m, (8, 8))
    assert lm.shape == (1, 1, 8, 8) and lm[..., :4, :].eq(1).all() and lm[..., 4:, :].eq(0).all()


def test_only_the_new_embedding_rows_train(prepared):
    tr = make_trainer(prepared, lr=1e-2)
    emb = tr.text_encoder.get_input_embeddings()
    frozen = {n: p.detach().clone() for m in (tr.unet, tr.vae, tr.text_encoder) for n, p in m.named_parameters()}
    emb_before = emb.weight.detach().clone()
    class_row = emb.weight[tr.tokenizer("toy", add_special_tokens=False).input_ids].mean(0)
    assert torch.allclose(tr.id_tokens.embeddings, class_row.expand(4, -1))  # initialised from the class word
    tr.optimizer.zero_grad()
    tr.batch_loss(sample_batch(tr.images, tr.masks, tr.cfg, "toy", 0), tr.draw_noise(2, 64, torch.Generator().manual_seed(0))).backward()
    grads = [n for m in (tr.unet, tr.vae, tr.text_encoder) for n, p in m.named_parameters() if p.grad is not None]
    assert grads == [] and emb.weight.grad is None  # no other weight, no other embedding row, gets a gradient
    assert tr.id_tokens.embeddings.grad.abs().sum(1).gt(0).all()  # every ID vector does
    assert [p for g in tr.optimizer.param_groups for p in g["params"]] == [tr.id_tokens.embeddings]
    for k in range(3):
        tr.step(k)
    after = {n: p for m in (tr.unet, tr.vae, tr.text_encoder) for n, p in m.named_parameters()}
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    tr.id_tokens.write_rows(emb)
    changed = (emb.weight != emb_before).any(1).nonzero().flatten().tolist()
    assert changed == tr.id_tokens.ids


def test_gradient_accumulation_equals_the_whole_batch(prepared):
    whole, parts = make_trainer(prepared, batch_size=4), make_trainer(prepared, batch_size=4, micro_batch=1)
    loss_whole, loss_parts = whole.step(0), parts.step(0)
    assert loss_whole == pytest.approx(loss_parts, rel=1e-5)
    assert torch.allclose(whole.id_tokens.embeddings, parts.id_tokens.embeddings, atol=1e-6)
    assert not torch.equal(whole.id_tokens.embeddings, make_trainer(prepared).id_tokens.embeddings)  # it did train


def test_loss_on_the_training_set_goes_down(prepared):
    tr = make_trainer(prepared, lr=1e-2)
    before = tr.evaluation_loss()
    for k in range(20):
        tr.step(k)
    after = tr.evaluation_loss()
    assert after < before * 0.99, (before, after)


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(prepared, tmp_path, monkeypatch):
    kw = dict(data=prepared, steps=6, batch_size=2, lr=1e-2, checkpoint_every=0, validation_steps=2)
    full = train(TrainConfig(**kw, out=tmp_path / "full.safetensors"), quiet=True)
    real_step = IdTrainer.step

    def interrupted(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(IdTrainer, "step", interrupted)
    out = tmp_path / "part.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**kw, out=out), quiet=True)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial identity
    ckpt = tmp_path / "part-checkpoints" / "step-000004"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(IdTrainer, "step", real_step)
    resumed = train(TrainConfig(**kw, out=out, resume="latest"), quiet=True)
    a, info = read_identity(full.path)
    b, _ = read_identity(resumed.path)
    assert torch.equal(a, b) and info.steps == 6
    # the record's loss_start is the run's first loss, not the resumed step's
    assert resumed.loss_start == full.loss_start and resumed.loss_end == full.loss_end
    assert json.loads(out.with_name(out.name + ".json").read_text())["loss_start"] == full.loss_start
    # a checkpoint of another identity or base model is refused, naming the file
    with pytest.raises(ValueError, match=r"state\.json.*another identity.*token"):
        train(TrainConfig(**{**kw, "steps": 8}, token="<w*>", out=tmp_path / "w.safetensors", resume=ckpt), quiet=True)
    with pytest.raises(ValueError, match=r"state\.json.*num_vectors"):
        train(TrainConfig(**{**kw, "steps": 8}, num_vectors=2, out=tmp_path / "w.safetensors", resume=ckpt), quiet=True)
    assert not (tmp_path / "w.safetensors").exists()


def test_ctrl_c_in_the_final_loss_evaluation_keeps_the_run(prepared, tmp_path, monkeypatch):
    """--checkpoint-every 0 and Ctrl-C while the final loss is evaluated: a checkpoint of the last step is
    saved, and --resume finishes the run as if uninterrupted (also from a checkpoint that kept no loss_start)."""
    kw = dict(data=prepared, steps=3, batch_size=2, lr=1e-2, checkpoint_every=0, validation_steps=2)
    full = train(TrainConfig(**kw, out=tmp_path / "full.safetensors"), quiet=True)
    real = IdTrainer.evaluation_loss
    calls = []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the first is loss_start, the second the final loss
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(IdTrainer, "evaluation_loss", interrupted)
    out = tmp_path / "part.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**kw, out=out), quiet=True)
    monkeypatch.setattr(IdTrainer, "evaluation_loss", real)
    ckpt = tmp_path / "part-checkpoints" / "step-000003"
    state = json.loads((ckpt / "state.json").read_text())
    assert not out.exists() and state["step"] == 3 and state["loss_start"] == full.loss_start
    resumed = train(TrainConfig(**kw, out=out, resume="latest"), quiet=True)
    assert torch.equal(read_identity(resumed.path)[0], read_identity(full.path)[0])
    assert (resumed.loss_start, resumed.loss_end) == (full.loss_start, full.loss_end)
    del state["loss_start"]  # a checkpoint written before the first loss was kept: evaluated from the start vectors
    (ckpt / "state.json").write_text(json.dumps(state))
    again = train(TrainConfig(**kw, out=tmp_path / "again.safetensors", resume=ckpt), quiet=True)
    assert again.loss_start == pytest.approx(full.loss_start, abs=1e-6)


def test_resume_from_another_base_is_refused(prepared, tmp_path, tiny_model_dir):
    kw = dict(data=prepared, steps=2, batch_size=1, checkpoint_every=1, validation_steps=2, validation_images=1)
    train(TrainConfig(**kw, out=tmp_path / "a.safetensors"), quiet=True)
    ckpt = tmp_path / "a-checkpoints" / "step-000001"
    frame = Image.open(ckpt / "validation.png")
    assert frame.size == (64, 64)  # validation frames beside each checkpoint
    folder = ModelSpec(base=str(tiny_model_dir))  # the same weights saved as a diffusers folder: another base
    with pytest.raises(ValueError, match=r"state\.json.*base model 'tiny'"):
        train(TrainConfig(**kw, out=tmp_path / "b.safetensors", resume=ckpt, models=folder), quiet=True)
    res = train(TrainConfig(**{**kw, "checkpoint_every": 0}, out=tmp_path / "b.safetensors", models=folder), quiet=True)
    assert read_identity(res.path)[1].base == str(tiny_model_dir)


def test_identity_file_loads_in_stock_diffusers_with_the_same_embeddings(prepared, tmp_path):
    res = train(TrainConfig(data=prepared, steps=3, batch_size=2, lr=1e-2, checkpoint_every=0, out=tmp_path / "id.safetensors"), quiet=True)
    assert res.size_bytes == res.path.stat().st_size < 2048  # 4 × 32 floats + header on the tiny model
    emb, info = read_identity(res.path)
    assert emb.shape == (4, 32) and info.token == "<v*>" and info.class_word == "toy" and info.base == "tiny" and info.masked
    stock, ours = stock_sd(), stock_sd()
    stock.load_textual_inversion(str(res.path), token="<v*>")  # stock loader, the file's path
    load_identities(ours, [res.path])
    prompt = "a photo of a <v*> toy on the beach"
    e_stock = stock.encode_prompt(prompt, "cpu", 1, False)[0]
    e_ours = ours.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.equal(e_stock, e_ours)
    # and the same conditioning the trainer optimised (its hook-injected vectors)
    tr = make_trainer(prepared)
    with torch.no_grad():
        tr.id_tokens.embeddings.copy_(emb)
        e_train = tr.encode_prompts([prompt])
    assert torch.allclose(e_train, e_stock, atol=1e-6)
    plain = stock_sd().encode_prompt("a photo of a toy on the beach", "cpu", 1, False)[0]
    assert not torch.allclose(e_stock[:, :8], plain[:, :8])


def test_several_identities_expand_each_to_its_own_vectors(tmp_path):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 32, generator=g), torch.randn(3, 32, generator=g)
    save_identity(tmp_path / "a.safetensors", a, IdentityInfo(token="<a*>", class_word="dog", num_vectors=2, base="tiny", hidden_size=32))
    save_identity(tmp_path / "b.safetensors", b, IdentityInfo(token="<b*>", class_word="cat", num_vectors=3, base="tiny", hidden_size=32))
    pipe = stock_sd()
    load_identities(pipe, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    prompt = "a <a*> dog and a <b*> cat"
    expanded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    assert expanded == expand_prompt(expand_prompt(prompt, "<a*>", 2), "<b*>", 3) == "a <a*> <a*>_1 dog and a <b*> <b*>_1 <b*>_2 cat"
    ids = pipe.tokenizer(expanded).input_ids
    want = pipe.tokenizer.convert_tokens_to_ids(["<a*>", "<a*>_1", "<b*>", "<b*>_1", "<b*>_2"])
    assert [i for i in ids if i in want] == want
    rows = pipe.text_encoder.get_input_embeddings()(torch.tensor(want))
    assert torch.equal(rows, torch.cat([a, b]))


def test_bad_training_input(prepared, tmp_path):
    base = dict(data=prepared, steps=1, out=tmp_path / "x.safetensors")
    for kw, needle in (
        ({"num_vectors": 0}, "--num-vectors"),
        ({"token": "two words"}, "--token"),
        ({"steps": 0}, "--steps"),
        ({"lr": -1.0}, "--lr"),
        ({"micro_batch": 9}, "--micro-batch"),
        ({"out": tmp_path / "x.bin"}, "--out"),
        ({"data": tmp_path}, "--data"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=needle):
            train(TrainConfig(**{**base, **kw}), quiet=True)
    with pytest.raises(ValueError, match="'toy' is already in the base model's vocabulary"):
        train(TrainConfig(**{**base, "token": "toy"}), quiet=True)
    assert not list(tmp_path.iterdir())


def test_train_cli_writes_identity_and_generate_uses_it(prepared, tmp_path, capsys):
    out = tmp_path / "me.safetensors"
    code = main(["train", "--data", str(prepared), "--steps", "1", "--batch-size", "1", "--checkpoint-every", "0", "--out", str(out), "--quiet"])
    cap = capsys.readouterr()
    assert code == 0 and "KB" in cap.out and out.is_file()
    code = main(["generate", "--identity", str(out), "--prompt", "a dog", "--frames", "2", "--steps", "1", "--out", str(tmp_path / "v.gif"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'<v*>'" in err[0]  # the prompt must name the identity's token
    code = main(["generate", "--identity", str(out), "--prompt", "a <v*> toy", "--frames", "2", "--steps", "1", "--out", str(tmp_path / "v.gif"), "--quiet"])
    assert code == 0 and (tmp_path / "v.gif").is_file()
    assert "noise" in capsys.readouterr().err  # the tiny preset's warning
    code = main(["train", "--data", str(prepared), "--num-vectors", "0", "--out", str(tmp_path / "y.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--num-vectors" in err[0] and not (tmp_path / "y.safetensors").exists()
