"""``specdec``: the command-line client.

    specdec generate "PROMPT" [--max-tokens N] [--num-draft K|auto] [--temperature T]
                     [--top-k K] [--top-p P] [--delta D] [--seed S] [--no-speculation]
                     [--json] [--address HOST:PORT]
    specdec status [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from specdec_pb import specdec_pb2 as pb

from .client import DEFAULT_ADDRESS, SpecdecClient


def _num_draft(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--num-draft takes a number >= 1 or 'auto', not {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError("--num-draft must be >= 1 (or 'auto')")
    return k


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Talk to a specdec orchestrator.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=os.environ.get("SPECDEC_ADDRESS", DEFAULT_ADDRESS),
                        help=f"orchestrator HOST:PORT (default $SPECDEC_ADDRESS or {DEFAULT_ADDRESS})")
    common.add_argument("--token", default=os.environ.get("SPECDEC_TOKEN"),
                        help="bearer token, if the orchestrator requires one (default $SPECDEC_TOKEN)")
    common.add_argument("--tls-ca", help="PEM CA to verify the orchestrator's TLS certificate")
    common.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds (default 300)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="generate a completion, streamed")
    gen.add_argument("prompt", help="input text")
    gen.add_argument("--max-tokens", type=int, default=0, help="most tokens to generate (default: server's, 64)")
    gen.add_argument("--num-draft", type=_num_draft, default=0,
                     help="draft tokens per step k, or 'auto' to adapt (default: server's, 5)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="top-k filter, 0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus filter, 1 = off")
    gen.add_argument("--delta", type=float, default=0.0,
                     help="lenience in [0, 1]: accept with min(1, p/q + delta); 0 = exact (default)")
    gen.add_argument("--seed", type=int, help="seed for reproducible sampling")
    gen.add_argument("--no-speculation", action="store_true", help="decode with the target alone (baseline)")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")

    sub.add_parser("status", parents=[common], help="replicas behind the orchestrator")
    return parser


def format_stats(stats: pb.GenerateStats, finish_reason: str) -> str:
    seconds = stats.total_ms / 1e3
    rate = stats.tokens / seconds if seconds > 0 else 0.0
    return (
        f"[{stats.tokens} tokens, {finish_reason}, {seconds:.2f} s, {rate:.1f} tok/s | "
        f"accepted {stats.accepted}/{stats.proposed} drafts ({stats.acceptance_rate:.0%}) | "
        f"{stats.target_passes} target passes, {stats.draft_passes} draft passes, k={stats.final_num_draft} | "
        f"draft {stats.draft_ms:.0f} ms, verify {stats.verify_ms:.0f} ms, "
        f"orchestration {stats.orchestration_ms:.0f} ms]"
    )


def _generate(args: argparse.Namespace, client: SpecdecClient) -> int:
    options = dict(
        max_tokens=args.max_tokens, num_draft=args.num_draft, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, delta=args.delta, seed=args.seed,
        speculative=not args.no_speculation,
    )
    if args.json:
        response = client.generate(args.prompt, **options)
        print(json.dumps({
            "text": response.text,
            "token_ids": list(response.token_ids),
            "finish_reason": response.finish_reason,
            "stats": MessageToDict(response.stats, preserving_proto_field_name=True,
                                   always_print_fields_with_no_presence=True),
        }))
        return 0
    final: pb.GenerateStreamResponse | None = None
    for chunk in client.stream(args.prompt, **options):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.finish_reason:
            final = chunk
    sys.stdout.write("\n")
    if final is not None:
        print(format_stats(final.stats, final.finish_reason))
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    client = SpecdecClient(args.address, token=args.token, tls_ca=args.tls_ca, timeout=args.timeout)
    try:
        if args.command == "generate":
            code = _generate(args, client)
        else:
            print(json.dumps(MessageToDict(client.status(), preserving_proto_field_name=True), indent=2))
            code = 0
    except grpc.RpcError as error:
        print(f"specdec: {error.code().name}: {error.details()}", file=sys.stderr)
        code = 1
    finally:
        client.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
