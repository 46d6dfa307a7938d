"""``specdec-draft``: serve a draft model."""

from __future__ import annotations

from draft_service.servicer import SERVICE_NAME, DraftServicer, add_to_server
from specdec_grpc.worker import run_worker


def main(argv: list[str] | None = None) -> None:
    run_worker("draft", DraftServicer, add_to_server, SERVICE_NAME, argv)


if __name__ == "__main__":
    main()
