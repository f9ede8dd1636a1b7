"""The Mistral-7B-v0.1 tokenizer, loaded offline from the `mistral-common` package.

`mistral_common/data/tokenizer.model.v1` is the SentencePiece model of Mistral-7B-v0.1
(vocab 32000, bos 1, eos 2). transformers 5 ignores `vocab_file=` for Llama tokenizers, so
the file is copied as `tokenizer.model` into a directory and loaded with `from_pretrained`.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from core.files import staged_dir

MISTRAL_VOCAB_SIZE = 32000
MISTRAL_BOS_ID = 1
MISTRAL_EOS_ID = 2


def mistral_sentencepiece_file() -> Path:
    """Path of the Mistral-7B-v0.1 SentencePiece model shipped by `mistral-common`."""
    path = Path(str(resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall the `mistral-common` package (make setup)"
        )
    return path


def _tokenizer_dir() -> Path:
    """A directory holding the SentencePiece file as `tokenizer.model` (created once)."""
    source = mistral_sentencepiece_file()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"mistral-7b-v0.1-tokenizer-{digest}"
    if not (target / "tokenizer.model").is_file():
        # another process may make the same folder meanwhile: its copy is identical, kept
        with staged_dir(target, keep_existing=True) as staging:
            shutil.copyfile(source, staging / "tokenizer.model")
    return target


@functools.lru_cache(maxsize=1)
def load_mistral_tokenizer():
    """The Mistral-7B-v0.1 tokenizer (adds BOS, not EOS), as `from_pretrained` would give it."""
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(
        str(_tokenizer_dir()), add_bos_token=True, add_eos_token=False
    )
    if len(tokenizer) != MISTRAL_VOCAB_SIZE or tokenizer.eos_token_id != MISTRAL_EOS_ID:
        raise RuntimeError(
            f"Mistral tokenizer loaded wrongly (vocab {len(tokenizer)}, eos "
            f"{tokenizer.eos_token_id}); check the sentencepiece/protobuf pins in pyproject.toml"
        )
    return tokenizer


def count_tokens(texts: list[str]) -> list[int]:
    """Mistral tokens per text, without BOS/EOS."""
    tokenizer = load_mistral_tokenizer()
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
