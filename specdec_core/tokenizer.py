"""Tokenizer loading through transformers' AutoTokenizer, and a fingerprint to compare them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# T5 places tokens by relative position: no prompt length breaks it. A checkpoint's
# tokenizer_config "model_max_length" (512 for t5-*, 64 for the demo pair) only makes transformers
# warn that a longer prompt "will result in indexing errors"; the real limits are --max-prompt-tokens.
NO_LENGTH_LIMIT = int(1e30)  # transformers' own value for "no limit"


def load_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """The tokenizer stored beside a checkpoint (spiece.model or tokenizer.json), without a
    maximum length (see NO_LENGTH_LIMIT).

    Always ``from_pretrained(dir)``: in transformers 5, ``T5Tokenizer(vocab_file=...)``
    silently builds a ~100-token vocabulary.
    """
    tokenizer = _load(directory)
    tokenizer.model_max_length = NO_LENGTH_LIMIT
    return tokenizer


def _load(directory: str | os.PathLike[str]) -> Any:
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer directory {path} does not exist")
    if not any((path / name).is_file() for name in ("spiece.model", "tokenizer.json")):
        raise CheckpointError(f"{path} has no tokenizer (spiece.model or tokenizer.json)")
    try:
        # T5's own class first: importing AutoTokenizer pulls in torch (~3 s per process start).
        from transformers.models.t5.tokenization_t5 import T5Tokenizer

        return T5Tokenizer.from_pretrained(str(path))
    except Exception:  # noqa: BLE001 - another tokenizer class, or an older transformers
        pass
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {exc}") from exc


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary and special ids: equal fingerprints tokenize alike."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
