"""TextStream: streamed text deltas, joined, equal the final decode (no MLX, no servers; outside
tests/unit because transformers' tokenizers import torch).

Three real tokenizers decode the same sentencepiece model (trained here with byte fallback):
transformers' TokenizersBackend (HF ByteFallback + Fuse + Strip decoders: an invalid run of byte
tokens decodes to one U+FFFD per byte, so a later byte token can turn "ï" back into U+FFFDs),
sentencepiece's own decoder, and the project's T5Tokenizer (transformers 5 decodes byte pieces
literally). Each also runs with clean_up_tokenization_spaces on, where a later "." or "n't"
removes a space that came earlier.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.detokenize import TextStream
from specdec_core.tokenizer import load_tokenizer
from specdec_tools.tiny_checkpoints import corpus_lines

SAMPLE = "price 5€ naïve café 日本語 😀 don't stop . , ? ! it's ' q ' ok ."
VOCAB = 400  # 3 specials + 256 byte pieces + the rest learned


class SentencePieceDecoder:
    """sentencepiece's own decoder behind the tokenizer interface TextStream uses."""

    def __init__(self, model_file: Path, cleanup: bool = False):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.all_special_ids = [0, 1, 2]
        self.clean_up_tokenization_spaces = cleanup

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.sp.id_to_piece(ids)
        return [self.sp.id_to_piece(i) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        assert skip_special_tokens
        text = self.sp.decode([i for i in ids if i not in self.all_special_ids])
        if self.clean_up_tokenization_spaces:
            from transformers.tokenization_utils_base import PreTrainedTokenizerBase

            text = PreTrainedTokenizerBase.clean_up_tokenization(self, text)
        return text


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("bytefallback")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()[:400] + ["don't stop, it's ok."] * 5),
        model_writer=model, vocab_size=VOCAB, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    (out / "spiece.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "<pad>", "extra_ids": 0, "additional_special_tokens": []}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _load(kind: str, spm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    if kind == "hf-bytefallback":
        from transformers import AutoTokenizer

        out = tmp_path_factory.mktemp("hf")
        shutil.copy(spm_dir / "spiece.model", out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "TokenizersBackend", "eos_token": "</s>", "unk_token": "<unk>",
             "pad_token": "<pad>"}))
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        assert "ByteFallback" in str(tokenizer.backend_tokenizer.decoder)
        return tokenizer
    if kind == "sentencepiece":
        return SentencePieceDecoder(spm_dir / "spiece.model")
    return load_tokenizer(spm_dir)  # the production loader: T5Tokenizer.from_pretrained(dir)


@pytest.fixture(scope="module", params=["hf-bytefallback", "sentencepiece", "t5"])
def tokenizer(request: pytest.FixtureRequest, spm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return _load(request.param, spm_dir, tmp_path_factory)


def _piece_id(tokenizer, piece: str) -> int:
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    return pieces.index(piece)


def _stream(tokenizer, ids: list[int], chunks: list[int]) -> list[str]:
    stream = TextStream(tokenizer)
    deltas, start, i = [], 0, 0
    while start < len(ids):
        size = chunks[i % len(chunks)] if chunks else 1
        deltas.append(stream.push(ids[start:start + size]))
        start += size
        i += 1
    deltas.append(stream.flush())
    return deltas


def _interesting_ids(tokenizer, spm_dir: Path) -> list[int]:
    """Ids that stress decoding: the sample's pieces (spaces, punctuation, "n't"), the byte pieces
    of multi-byte characters, stray continuation and lead bytes, the bare space piece and the
    special ids."""
    import sentencepiece as spm

    ids = spm.SentencePieceProcessor(model_file=str(spm_dir / "spiece.model")).encode(SAMPLE)
    ids += [_piece_id(tokenizer, f"<0x{b:02X}>") for b in b"\xe2\x82\xac\xc3\xaf\xf0\x9f\x98\x80 .'\x80\xbf\xff"]
    return ids + [_piece_id(tokenizer, "▁"), 0, 1, 2]


@pytest.mark.parametrize("cleanup", [False, True])
@pytest.mark.parametrize("payload", ["ï€ .".encode(), "ï".encode() + b"\xe2"], ids=["complete", "cut"])
def test_byte_fallback_characters_stream_exactly(tokenizer, cleanup: bool, payload: bytes) -> None:
    """Byte pieces pushed one token at a time after "na": "ï" (two bytes) then a euro sign (three),
    or "ï" then a lone lead byte that a later ordinary piece leaves incomplete (transformers'
    ByteFallback then decodes the whole run, "ï" included, to U+FFFDs). The joined deltas are
    the final text; complete characters never stream as U+FFFD."""
    tokenizer.clean_up_tokenization_spaces = cleanup
    try:
        ids = [_piece_id(tokenizer, p) for p in ("▁", "n", "a")]
        ids += [_piece_id(tokenizer, f"<0x{b:02X}>") for b in payload]
        ids += [_piece_id(tokenizer, p) for p in ("▁", "o", "k", ".")]
        deltas = _stream(tokenizer, ids, [1])
        final = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == final
        if payload.endswith("€ .".encode()) and "<0x" not in final:  # byte pieces decode to bytes
            assert "ï€" in final
            assert not any("\ufffd" in delta for delta in deltas)
    finally:
        tokenizer.clean_up_tokenization_spaces = False


def test_streams_as_tokens_arrive(tokenizer, spm_dir: Path) -> None:
    """Holding back is bounded: after every token that is not a byte piece, everything decoded so
    far has been sent (without clean-up, nothing else can change earlier text)."""
    tokenizer.clean_up_tokenization_spaces = False
    import sentencepiece as spm

    ids = spm.SentencePieceProcessor(model_file=str(spm_dir / "spiece.model")).encode(SAMPLE)
    stream = TextStream(tokenizer)
    sent = ""
    for n, token in enumerate(ids, start=1):
        sent += stream.push([token])
        if not tokenizer.convert_ids_to_tokens(token).startswith("<0x"):
            assert sent == tokenizer.decode(ids[:n], skip_special_tokens=True)
    sent += stream.flush()
    assert sent == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("cleanup", [False, True])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_joined_deltas_equal_final_decode(tokenizer, cleanup: bool, spm_dir: Path, data: st.DataObject) -> None:
    """Random token ids pushed in random chunk sizes: "".join(deltas) == decode(all ids)."""
    tokenizer.clean_up_tokenization_spaces = cleanup
    try:
        interesting = _interesting_ids(tokenizer, spm_dir)
        token = st.one_of(st.sampled_from(interesting), st.integers(0, len(tokenizer) - 1))
        ids = data.draw(st.lists(token, max_size=40), label="ids")
        chunks = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=8), label="chunks")
        deltas = _stream(tokenizer, ids, chunks)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    finally:
        tokenizer.clean_up_tokenization_spaces = False
