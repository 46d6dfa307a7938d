"""A small synchronous Python client for the orchestrator.

    with SpecdecClient("127.0.0.1:50051") as client:
        print(client.generate("spell 1234", max_tokens=32).text)
        for chunk in client.stream("spell 1234"):
            print(chunk.text, end="", flush=True)

Both return the protocol's messages: ``generate`` a ``GenerateResponse`` (``text``,
``token_ids``, ``from_draft``, ``finish_reason``, ``stats``), ``stream`` an iterator of
``GenerateStreamResponse`` (``text``, ``token_ids``, ``from_draft``; the last one also
``finish_reason`` and ``stats``). ``from_draft`` holds one flag per token id: true for a draft
token the target accepted, false for a token the target wrote. With ``text_spans=True`` the
orchestrator also splits the text by who wrote it (``spans``: ``text`` and ``from_draft`` each);
``TextAttribution`` does the same on the client, given the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

from .detokenize import TextAttribution

__all__ = ["DEFAULT_ADDRESS", "SpecdecClient", "TextAttribution", "build_request"]

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
    text_spans: bool = False,
) -> pb.GenerateRequest:
    """``num_draft`` is k, 0 for the server default, or "auto" for the adaptive schedule;
    ``text_spans`` asks for the text split by who wrote it (``spans`` of each message)."""
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
        text_spans=text_spans,
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
