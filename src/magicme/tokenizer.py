"""A real CLIP byte-level BPE tokenizer for the tiny preset, built offline and deterministically.

The vocabulary follows CLIP's scheme (every byte as a unicode character, the same with the
end-of-word marker "</w>", learned merges, then the two special tokens); the merges are learned
here from a small built-in English corpus, so no file has to be downloaded. The result is loaded
by transformers' own `CLIPTokenizer`, the class real Stable Diffusion checkpoints use.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

# Words that prompts and templates of this field use; enough to learn a few hundred merges.
_CORPUS = """
a photo of the dog cat woman man person child girl boy toy robot car teddy bear backpack statue
in on with at by from into over under near beside while during after before and or its his her
running walking sitting standing jumping swimming dancing flying playing smiling looking reading
beach snow forest city street park mountain river lake ocean waves sunset sunrise night rain
garden kitchen cafe room window fireplace desert field road bridge sky clouds stars moon sun
wearing hat jacket dress shirt glasses scarf cowboy western vibes cozy gentle calm playful
painting cartoon realistic cinematic lighting detailed high quality best masterpiece portrait
close up zoomed far away very small picture rendition cropped clean good bright dark large
weird nice cool one video frame camera slowly quickly background foreground landscape winter
summer autumn spring snowflakes drifting crashing coast wind tree trees flowers grass water
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken alphabetically)."""
    counts = Counter(words)
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, parts in splits.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, parts in splits.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = tuple(out)
    return merges


def write_tiny_clip_tokenizer_files(folder: str | Path, num_merges: int = 400) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` in CLIP's format into `folder`; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(bytes_to_unicode().values())
    merges = learn_merges(_CORPUS, num_merges)
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def tiny_clip_tokenizer(vocab_size: int | None = None):
    """A `transformers.CLIPTokenizer` over the built-in vocabulary (max length 77, like CLIP).

    `vocab_size` pads the vocabulary with unused entries to that size, the special tokens last as in CLIP
    (49,408 with `<|startoftext|>` 49406 and `<|endoftext|>` 49407): a stand-in of the real tokenizer's size
    for the real-size runs, since CLIP's own vocabulary cannot be downloaded here.
    """
    import json
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_tiny_clip_tokenizer_files(tmp)
        if vocab_size is not None:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            words = [t for t in sorted(vocab, key=vocab.get) if not t.startswith("<|")]
            if vocab_size < len(words) + 2:
                raise ValueError(f"vocab_size must be at least {len(words) + 2}, got {vocab_size}")
            words += [f"<|unused{i}|>" for i in range(vocab_size - 2 - len(words))]
            padded = {t: i for i, t in enumerate(words + ["<|startoftext|>", "<|endoftext|>"])}
            vocab_file.write_text(json.dumps(padded, ensure_ascii=False), encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")


def learn_unigram_pieces(words: list[str], num_merges: int = 400) -> list[tuple[str, float]]:
    """SentencePiece-style unigram pieces ("▁" marks a word start) with log-probability scores.

    The candidate pieces are the BPE merges learned on "▁word" forms plus every printable ASCII
    character (so no English prompt falls back to <unk>); each score is the log of the piece's
    smoothed frequency as a substring of the corpus, so Viterbi segmentation prefers whole words.
    """
    import math

    marked = ["▁" + w for w in words]
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    merged = ["".join(m).replace("</w>", "") for m in learn_merges(marked, num_merges)]
    pieces = list(dict.fromkeys(["▁", *chars, *merged]))
    counts = {p: 1 + sum(w.count(p) for w in marked) for p in pieces}
    total = sum(counts.values())
    return [(p, math.log(counts[p] / total)) for p in pieces]


def tiny_umt5_tokenizer(num_merges: int = 400):
    """A `transformers.T5Tokenizer` (unigram, Metaspace) in UMT5's form: <pad>=0, </s>=1, <unk>=2, "</s>" appended.

    Real Wan checkpoints ship google/umt5-xxl's tokenizer in the same class; this one is learned from
    the built-in corpus, so the tiny Wan preset needs no download.
    """
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    return T5Tokenizer(vocab=specials + learn_unigram_pieces(_CORPUS, num_merges), extra_ids=0, model_max_length=512)
