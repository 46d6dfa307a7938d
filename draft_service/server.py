"""``specdec-draft``: serve a draft model."""

from __future__ import annotations

from specdec_core import blas


def main(argv: list[str] | None = None) -> None:
    blas.preload()  # OpenBLAS goes global before the first MLX import (see specdec_core.blas)
    from draft_service.servicer import SERVICE_NAME, DraftServicer, add_to_server
    from specdec_grpc.worker import run_worker

    run_worker("draft", DraftServicer, add_to_server, SERVICE_NAME, argv)


if __name__ == "__main__":
    main()
