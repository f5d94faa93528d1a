"""Identities from other tools (reference Magic-Me .pt, A1111, diffusers), safe loading, reuse, reproducible files."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pickle_payload import CreatesFile
import magicme
from magicme.cli import main
from magicme.identity import (
    IdentityInfo,
    convert_identity,
    load_identities,
    read_identity,
    read_identity_info,
    save_identity,
)
from magicme.models import ModelSpec, load_pipeline

PROMPT = "a photo of a <v*> man"


def _vectors(seed=0, k=4):
    return torch.randn(k, 32, generator=torch.Generator().manual_seed(seed))


def _embeds(pipe, prompt=PROMPT):
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _fresh():
    return load_pipeline(ModelSpec(), device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    emb = _vectors()
    out = {"magicme": save_identity(root / "id.safetensors", emb, IdentityInfo(token="<v*>", class_word="man", num_vectors=4, hidden_size=32))}
    # the reference implementation's save_embedding: {"string_to_param": {"*": vectors of <new1>…<new4>}}
    torch.save({"string_to_param": {"*": emb.clone()}}, root / "last.pt")
    out["reference"] = root / "last.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": emb.clone()}, "name": "<v*>",
                "step": 400, "sd_checkpoint": "e1441589a6", "sd_checkpoint_name": "realisticVisionV51"}, root / "a1111.pt")
    out["a1111_pt"] = root / "a1111.pt"
    save_file({"emb_params": emb.clone()}, str(root / "a1111.safetensors"))
    out["a1111_st"] = root / "a1111.safetensors"
    torch.save({"<v*>": emb.clone()}, root / "learned_embeds.bin")
    out["diffusers_bin"] = root / "learned_embeds.bin"
    save_file({"<v*>": emb.clone()}, str(root / "learned_embeds.safetensors"))
    out["diffusers_st"] = root / "learned_embeds.safetensors"
    return out


@pytest.fixture(scope="module")
def expected(files):
    pipe = _fresh()
    load_identities(pipe, [files["magicme"]])
    return _embeds(pipe)


@pytest.mark.parametrize("kind", ["reference", "a1111_pt", "a1111_st", "diffusers_bin", "diffusers_st"])
def test_other_tools_files_give_the_same_prompt_embeddings(files, expected, kind):
    spec = str(files[kind]) if kind in ("a1111_pt", "diffusers_bin", "diffusers_st") else f"<v*>={files[kind]}"
    pipe = _fresh()
    (info,) = load_identities(pipe, [spec])
    assert info.token == "<v*>" and info.num_vectors == 4
    assert torch.equal(_embeds(pipe), expected)


@pytest.mark.parametrize("kind", ["a1111_pt", "a1111_st", "diffusers_bin"])
def test_stock_diffusers_loader_agrees(files, expected, kind):
    """The reference: diffusers' own load_textual_inversion reads these formats too."""
    pipe = _fresh()
    pipe.load_textual_inversion(str(files[kind]), token="<v*>")
    assert torch.equal(_embeds(pipe), expected)


def test_reference_pt_needs_a_token(files):
    with pytest.raises(ValueError, match="names no token.*--token"):
        read_identity_info(files["reference"])
    info = read_identity_info(f"<altman>={files['reference']}")
    assert (info.token, info.num_vectors, info.source, info.masked) == ("<altman>", 4, "magic-me-reference", True)
    a1111 = read_identity_info(files["a1111_pt"])
    assert (a1111.steps, a1111.source) == (400, "a1111") and "realisticVisionV51" in a1111.base


def test_pickle_carrying_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _vectors()}, "name": "<v*>", "x": CreatesFile(marker)}, path)
    with pytest.raises(ValueError, match="refused without running"):
        read_identity_info(path)
    assert not marker.exists()
    assert main(["identity", "info", str(path)]) == 2
    assert not marker.exists()


def test_sdxl_embedding_is_refused(tmp_path):
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="SDXL"):
        read_identity_info(f"<x>={tmp_path / 'x.safetensors'}")


def test_reused_pipeline_takes_the_second_identity(tmp_path):
    """Issue 12.7: a second file under an already-loaded token replaces the vectors, never keeps the old ones."""
    a = save_identity(tmp_path / "a.safetensors", _vectors(1), IdentityInfo(token="<v*>", class_word="man", num_vectors=4))
    b = save_identity(tmp_path / "b.safetensors", _vectors(2), IdentityInfo(token="<v*>", class_word="man", num_vectors=4))
    pipe = _fresh()
    load_identities(pipe, [a])
    first = _embeds(pipe)
    load_identities(pipe, [b])
    fresh = _fresh()
    load_identities(fresh, [b])
    assert not torch.equal(_embeds(pipe), first)
    assert torch.equal(_embeds(pipe), _embeds(fresh))
    c = save_identity(tmp_path / "c.safetensors", _vectors(3, k=2), IdentityInfo(token="<v*>", class_word="man", num_vectors=2))
    with pytest.raises(ValueError, match="already holds token '<v\\*>' with 4 vectors"):
        load_identities(pipe, [c])
    # two files trained under one token can still be used together, each under its own word
    both = _fresh()
    load_identities(both, [f"<a*>={a}", f"<b*>={b}"])
    assert not torch.equal(_embeds(both, "a <a*> man"), _embeds(both, "a <b*> man"))


def test_vocabulary_word_is_refused(tmp_path):
    pipe = _fresh()
    word = next(t for t in pipe.tokenizer.get_vocab() if t.isalpha() and len(t) > 2 and not t.endswith("</w>"))
    path = save_identity(tmp_path / "w.safetensors", _vectors(k=1), IdentityInfo(token=word, class_word="man", num_vectors=1))
    with pytest.raises(ValueError, match="word of the base model's vocabulary"):
        load_identities(pipe, [path])


_SAVE = """
import sys, torch
from magicme.identity import IdentityInfo, save_identity
info = IdentityInfo(token="<v*>", class_word="dog", num_vectors=2, base="tiny", steps=200, hidden_size=32)
save_identity(sys.argv[1], torch.arange(64, dtype=torch.float32).reshape(2, 32), info)
"""


def test_identity_files_are_byte_identical_between_runs(tmp_path):
    """Issue 12.9: the same identity written by two processes is the same file (content fingerprints hold)."""
    src = str(Path(magicme.__file__).parents[1])
    outs = []
    for i in range(3):
        out = tmp_path / f"id{i}.safetensors"
        subprocess.run([sys.executable, "-c", _SAVE, str(out)], check=True, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    emb, info = read_identity(tmp_path / "id0.safetensors")  # and safetensors' own reader reads it
    assert info.steps == 200 and torch.equal(emb, torch.arange(64, dtype=torch.float32).reshape(2, 32))


def test_identity_cli_info_and_convert(files, tmp_path, capsys):
    assert main(["identity", "info", str(files["reference"])]) == 0
    shown = capsys.readouterr().out
    assert "magic-me-reference" in shown and "vectors: 4" in shown and "width: 32" in shown and "pass --token" in shown
    out = tmp_path / "altman.safetensors"
    assert main(["identity", "convert", str(files["reference"]), str(out), "--token", "<altman>", "--class-word", "man"]) == 0
    emb, info = read_identity(out)
    assert torch.equal(emb, _vectors()) and (info.token, info.class_word, info.source) == ("<altman>", "man", "magic-me-reference")
    assert main(["identity", "convert", str(files["reference"]), str(out), "--token", "<altman>"]) == 2  # never over a file
    assert "exists" in capsys.readouterr().err
    assert main(["identity", "convert", str(files["reference"]), str(tmp_path / "x.safetensors")]) == 2  # no token
    again = tmp_path / "again.safetensors"
    convert_identity(files["reference"], again, token="<altman>", class_word="man")
    assert again.read_bytes() == out.read_bytes()


def test_long_prompt_keeps_the_identity_or_is_refused(tmp_path, caplog):
    """77 CLIP tokens with 4 identity vectors: cutting ordinary words warns, cutting the identity is refused."""
    from magicme.identity import check_prompt_length

    pipe = _fresh()
    ident = save_identity(tmp_path / "id.safetensors", _vectors(), IdentityInfo(token="<v*>", class_word="man", num_vectors=4))
    load_identities(pipe, [ident])
    filler = " ".join(["dog"] * 72)
    check_prompt_length(pipe, f"a <v*> man {filler}")  # 3 + 3 + 72 words: the tail is cut
    assert "ignoring" in caplog.text
    with pytest.raises(ValueError, match="identity token '<v\\*>.*would be cut off"):
        check_prompt_length(pipe, f"{filler} a <v*> man")
    check_prompt_length(pipe, "a <v*> man")
