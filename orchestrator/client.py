"""A small synchronous Python client for the orchestrator.

    with SpecdecClient("127.0.0.1:50051") as client:
        print(client.generate("spell 1234", max_tokens=32).text)
        for chunk in client.stream("spell 1234"):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator
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
