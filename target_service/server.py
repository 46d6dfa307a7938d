"""``specdec-target``: serve a target model."""

from __future__ import annotations

from specdec_grpc.worker import run_worker
from target_service.servicer import SERVICE_NAME, TargetServicer, add_to_server


def main(argv: list[str] | None = None) -> None:
    run_worker("target", TargetServicer, add_to_server, SERVICE_NAME, argv)


if __name__ == "__main__":
    main()
