"""The built-in tiny model (``builtin:tiny``): a small Llama with a byte-level tokenizer.

Weights live in ``lowalign/assets/tiny`` as a normal Hugging Face model directory, so it loads through
exactly the same path as a hub id or a local checkpoint. Rebuild them with::

    .venv/bin/python scripts/build_tiny.py          # see lowalign/assets/tiny/BUILD.md
"""

from __future__ import annotations

from pathlib import Path

TINY_DIR = Path(__file__).parent / "assets" / "tiny"
BUILTINS = {"builtin:tiny": TINY_DIR}


def tiny_config(**overrides):
    """LlamaConfig of the built-in model (about 1.5M parameters, ByT5's 384-token byte vocabulary)."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=384,  # ByT5: 3 specials + 256 bytes + 125 sentinel ids
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def byte_tokenizer():
    """transformers' ByT5Tokenizer: byte-level, needs no downloaded files. Left padding for generation."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    tok.padding_side = "left"
    return tok


def wide_tokenizer(vocab_size: int):
    """A fast character-level tokenizer padded with filler tokens to ``vocab_size`` entries, so a model with a
    real-size vocabulary (151936 for Qwen2) can decode anything it samples; built locally, no download.
    Ids: 0 <pad>, 1 </s>, 2 <unk>, then printable ASCII, then ``<|t{i}|>`` fillers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    vocab.update({f"<|t{i}|>": i for i in range(len(vocab), vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def resolve_builtin(name: str) -> Path | None:
    return BUILTINS.get(name)
