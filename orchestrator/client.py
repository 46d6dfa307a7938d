"""A small synchronous Python client for the orchestrator.

    with SpecdecClient("127.0.0.1:50051") as client:
        print(client.generate("spell 1234", max_tokens=32).text)
        for chunk in client.stream("spell 1234"):
            print(chunk.text, end="", flush=True)

Both return the protocol's messages: ``generate`` a ``GenerateResponse`` (``text``,
``token_ids``, ``from_draft``, ``finish_reason``, ``stats``), ``stream`` an iterator of
``GenerateStreamResponse`` (``text``, ``token_ids``, ``from_draft``; the last one also
``finish_reason`` and ``stats``). ``from_draft`` holds one flag per token id: true for a draft
token the target accepted, false for a token the target wrote. ``TextAttribution`` maps those
flags onto the text, given the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


def build_request(
    prompt: str,
    max_tokens: int = 0,
    num_draft: int | str = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    delta: float = 0.0,
    seed: int | None = None,
    speculative: bool = True,
    pipeline: bool | None = None,
) -> pb.GenerateRequest:
    """``num_draft`` is k, 0 for the server default, or "auto" for the adaptive schedule."""
    auto = num_draft == "auto"
    request = pb.GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        num_draft=0 if auto else int(num_draft),
        num_draft_auto=auto,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        delta=delta,
        speculative=speculative,
    )
    if seed is not None:
        request.seed = seed
    if pipeline is not None:  # unset: the orchestrator's default
        request.pipeline = pipeline
    return request


class SpecdecClient:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        token: str | None = None,
        tls_ca: str | None = None,
        timeout: float | None = None,
    ):
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(address, credentials)
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.OrchestratorStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def generate(self, prompt: str, timeout: float | None = None, **options: Any) -> pb.GenerateResponse:
        return self.stub.Generate(build_request(prompt, **options), timeout=timeout or self.timeout,
                                  metadata=self.metadata)

    def stream(self, prompt: str, timeout: float | None = None, **options: Any) -> Iterator[pb.GenerateStreamResponse]:
        return self.stub.GenerateStream(build_request(prompt, **options), timeout=timeout or self.timeout,
                                        metadata=self.metadata)

    def status(self) -> pb.StatusResponse:
        return self.stub.Status(pb.StatusRequest(), timeout=self.timeout or 10, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SpecdecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TextAttribution:
    """Which characters of a generation's text came from accepted draft tokens, exactly.

    The wire carries one ``from_draft`` flag per token id, but not where one token's text ends
    inside a message's text: a step's tokens are accepted drafts followed by one token of the
    target's, and the server holds text back while a later token could still change it, so a
    message's text need not even be its own tokens' text. With the tokenizer (the same files
    the orchestrator uses) the text is attributed character by character: after each token the
    token ids so far are decoded as the server decodes them (``skip_special_tokens``), and the
    characters that token added, or changed, belong to it. A character built from several
    tokens (byte pieces of one UTF-8 character) belongs to the token that completed it.

    Feed every message of a stream (or one whole ``GenerateResponse``) to ``push``, in order.
    The server's text is what is returned, split into runs ``(text, from_draft)``; the decoding
    is checked against it, and from the first disagreement on (another tokenizer) the text comes
    back unattributed, as ``(text, None)``: never a guessed colour.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.from_draft: list[bool] = []
        self.decoded = ""  # the token ids so far, decoded
        self.owner: list[int] = []  # per character of ``decoded``: the index of the token that wrote it
        self.text = ""  # the server's text so far
        self.agrees = True

    def push(self, token_ids: Sequence[int], from_draft: Sequence[bool], text: str) -> list[tuple[str, bool | None]]:
        """One message's token ids, flags and text; returns the text as runs of one source."""
        if len(from_draft) != len(token_ids):
            self.agrees = False  # a server without the flags: nothing to attribute
        for token, flag in zip(token_ids, from_draft, strict=False):
            self.token_ids.append(int(token))
            self.from_draft.append(bool(flag))
            decoded = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            common = 0
            for a, b in zip(self.decoded, decoded, strict=False):
                if a != b:
                    break
                common += 1
            self.owner[common:] = [len(self.token_ids) - 1] * (len(decoded) - common)
            self.decoded = decoded
        start = len(self.text)
        self.text += text
        if not text:
            return []
        if not (self.agrees and self.decoded.startswith(self.text)):
            self.agrees = False
            return [(text, None)]
        runs: list[tuple[str, bool | None]] = []
        for offset, char in enumerate(text):
            flag = self.from_draft[self.owner[start + offset]]
            if runs and runs[-1][1] == flag:
                runs[-1] = (runs[-1][0] + char, flag)
            else:
                runs.append((char, flag))
        return runs
