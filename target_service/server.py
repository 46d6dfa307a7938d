"""``specdec-target``: serve a target model."""

from __future__ import annotations

from specdec_core import blas


def main(argv: list[str] | None = None) -> None:
    blas.preload()  # OpenBLAS goes global before the first MLX import (see specdec_core.blas)
    from specdec_grpc.worker import run_worker
    from target_service.servicer import SERVICE_NAME, TargetServicer, add_to_server

    run_worker("target", TargetServicer, add_to_server, SERVICE_NAME, argv)


if __name__ == "__main__":
    main()
