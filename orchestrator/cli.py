"""``specdec``: the command-line client.

    specdec generate "PROMPT" [--max-tokens N] [--num-draft K|auto] [--temperature T]
                     [--top-k K] [--top-p P] [--delta D] [--seed S] [--no-speculation] [--no-pipeline]
                     [--json] [--color [--tokenizer DIR]] [--address HOST:PORT]
    specdec status [--json | --watch [SECONDS] [--count N]] [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from specdec_core.cache_bytes import TYPICAL_DECODER_POSITIONS, TYPICAL_PROMPT_TOKENS
from specdec_core.sizes import format_bytes
from specdec_pb import specdec_pb2 as pb

from .client import DEFAULT_ADDRESS, SpecdecClient, TextAttribution
from .status_watch import watch

# SGR colours of --color: accepted draft tokens, tokens the target wrote; then back to plain.
DRAFT_COLOR = "\033[32m"  # green
TARGET_COLOR = "\033[35m"  # magenta
RESET = "\033[0m"
COLOR_HELP = (
    "colour the text by who wrote it: accepted draft tokens green, tokens the target wrote "
    "(corrections, bonus tokens) magenta. Exact to the character: the orchestrator splits the text "
    "by who wrote it with its tokenizer (with --tokenizer the client does it instead, checking its "
    "decoding against the server's text; from a disagreement on, the rest is plain). Only on a "
    "terminal: plain text when stdout is not a TTY or NO_COLOR is set"
)


def _num_draft(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--num-draft takes a number >= 1 or 'auto', not {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError("--num-draft must be >= 1 (or 'auto'); to decode with the target "
                                         "alone, use --no-speculation")
    return k


WATCH_SECONDS = 2.0


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--watch takes seconds between refreshes, not {value!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("--watch must be a positive number of seconds")
    return seconds


def _refreshes(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--count takes a number of refreshes >= 1, not {value!r}")
    return int(value)


def _max_tokens(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-tokens takes a number >= 1, not {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(
            "--max-tokens must be >= 1 (leave it out for the server's default, 64)")
    return n


class _Parser(argparse.ArgumentParser):
    """A flag the subcommand does not know is reported with the subcommand's usage (argparse
    would show the top-level one), with the nearest flag it has when there is one."""

    def parse_args(self, args: Any = None,  # type: ignore[override]
                   namespace: Any = None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self._subcommands.get(getattr(parsed, "command", None) or "", self)
            flags = [flag for action in command._actions for flag in action.option_strings]
            near = [match for word in unknown if word.startswith("-")
                    for match in difflib.get_close_matches(word.split("=")[0], flags, n=1)]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
        return parsed

    _subcommands: dict[str, argparse.ArgumentParser] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specdec", description="Talk to a specdec orchestrator.")
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
    gen.add_argument("--max-tokens", type=_max_tokens, help="most tokens to generate (default: server's, 64)")
    gen.add_argument("--num-draft", type=_num_draft,
                     help="draft tokens per step k, or 'auto' to adapt (default: server's, 5)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="top-k filter, 0 = off (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus filter, 1 = off (default)")
    gen.add_argument("--delta", type=float, default=0.0,
                     help="lenience in [0, 1]: accept with min(1, p/q + delta); 0 = exact (default)")
    gen.add_argument("--seed", type=int, help="seed for reproducible sampling")
    gen.add_argument("--no-speculation", action="store_true", help="decode with the target alone (baseline)")
    gen.add_argument("--no-pipeline", action="store_true",
                     help="draft only after each verdict (default: the orchestrator's setting, normally "
                          "drafting the next block while the target verifies; same output either way)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object: text, token_ids, from_draft, finish_reason, stats")
    gen.add_argument("--color", action="store_true", help=COLOR_HELP)
    gen.add_argument("--tokenizer", default=os.environ.get("SPECDEC_TOKENIZER"),
                     help="directory with the models' tokenizer files (e.g. the target's model directory): "
                          "--color then attributes the text on the client (default $SPECDEC_TOKENIZER; "
                          "unset: the orchestrator attributes it)")

    status = sub.add_parser("status", parents=[common],
                            help="replicas behind the orchestrator: health and live load")
    status.add_argument("--json", action="store_true", help="print the StatusResponse as JSON")
    status.add_argument("--watch", type=_seconds, nargs="?", const=WATCH_SECONDS, metavar="SECONDS",
                        help="refresh every SECONDS (default when given alone: "
                             f"{WATCH_SECONDS:g}) with batch size, tokens/s and acceptance per replica, like "
                             "top; plain text blocks when stdout is not a terminal; Ctrl-C stops")
    status.add_argument("--count", type=_refreshes, metavar="N",
                        help="with --watch: stop after N refreshes (default: until Ctrl-C)")
    parser._subcommands = {"generate": gen, "status": status}
    return parser


def color_wanted(flag: bool, stream: Any = None) -> bool:
    """--color applies on a terminal only, and never when NO_COLOR is set (https://no-color.org)."""
    stream = stream if stream is not None else sys.stdout
    return flag and not os.environ.get("NO_COLOR") and stream.isatty()


def colored(runs: list[tuple[str, bool | None]]) -> str:
    """Runs of (text, from_draft) in their colours; unattributed text (None) plain."""
    return "".join(
        text if flag is None else f"{DRAFT_COLOR if flag else TARGET_COLOR}{text}{RESET}"
        for text, flag in runs if text
    )


def format_stats(stats: pb.GenerateStats, finish_reason: str) -> str:
    """One line: tokens and speed, time to first token, acceptance (and per draft position:
    accepted/proposed at position 1, 2, ...), passes, and time split into draft and verify calls,
    each with the share the workers spent on model work (the rest is wire and queueing)."""
    seconds = stats.total_ms / 1e3
    rate = stats.tokens / seconds if seconds > 0 else 0.0
    positions = " ".join(f"{a}/{p}" for a, p in zip(stats.accepted_per_position, stats.proposed_per_position,
                                                   strict=False))
    failovers = f", {_count(stats.failovers, 'failover')}" if stats.failovers else ""
    head = (f"[{_count(stats.tokens, 'token')}, {finish_reason}, {seconds:.2f} s, {rate:.1f} tok/s, "
            f"first token {stats.time_to_first_token_ms:.0f} ms | ")
    verify = f"verify {stats.verify_ms:.0f} ms (model {stats.target_model_ms:.0f})"
    orchestration = f"orchestration {stats.orchestration_ms:.0f} ms{failovers}]"
    if stats.proposed == 0 and stats.draft_passes == 0:  # --no-speculation, or no draft was free
        return (head + f"no drafts: the target alone | {_count(stats.target_passes, 'target pass')} | "
                f"{verify}, {orchestration}")
    # Blocks drafted ahead run while the target verifies: their time is inside verify's, not draft's.
    ahead = (f", {_count(stats.predrafts, 'block')} drafted ahead during verify ({stats.predraft_hits} used)"
             if stats.predrafts else "")
    return (
        head + f"accepted {stats.accepted}/{stats.proposed} drafts ({stats.acceptance_rate:.0%})"
        + (f", by position {positions}" if positions else "") + " | "
        f"{_count(stats.target_passes, 'target pass')}, {_count(stats.draft_passes, 'draft pass')}, "
        f"k={stats.final_num_draft} | "
        f"draft {stats.draft_ms:.0f} ms (model {stats.draft_model_ms:.0f}){ahead}, {verify}, {orchestration}"
    )


def _count(n: int, noun: str) -> str:
    """``1 token``, ``2 tokens``, ``1 target pass``, ``3 target passes``."""
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{n} {noun if n == 1 else plural}"


class PartialStats:
    """What the client itself saw of a stream, for a line when it is interrupted (the server's
    stats come only with the last message)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_token_s: float | None = None
        self.tokens = 0
        self.from_draft = 0

    def push(self, chunk: pb.GenerateStreamResponse) -> None:
        if chunk.token_ids and self.first_token_s is None:
            self.first_token_s = time.monotonic() - self.started
        self.tokens += len(chunk.token_ids)
        self.from_draft += sum(chunk.from_draft)

    def line(self) -> str:
        seconds = time.monotonic() - self.started
        first = f", first token {self.first_token_s * 1e3:.0f} ms" if self.first_token_s is not None else ""
        share = f" ({self.from_draft / self.tokens:.0%})" if self.tokens else ""
        return (f"[interrupted: {_count(self.tokens, 'token')} in {seconds:.2f} s, "
                f"{self.tokens / seconds if seconds > 0 else 0.0:.1f} tok/s{first} | "
                f"{self.from_draft} from the draft{share}]")


def _generate(args: argparse.Namespace, client: SpecdecClient) -> int:
    options = dict(
        max_tokens=args.max_tokens or 0, num_draft=args.num_draft or 0, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, delta=args.delta, seed=args.seed,
        speculative=not args.no_speculation,
        pipeline=False if args.no_pipeline else None,
    )
    if args.json:
        response = client.generate(args.prompt, **options)
        print(json.dumps({
            "text": response.text,
            "token_ids": list(response.token_ids),
            "from_draft": list(response.from_draft),
            "finish_reason": response.finish_reason,
            "stats": MessageToDict(response.stats, preserving_proto_field_name=True,
                                   always_print_fields_with_no_presence=True),
        }))
        return 0
    attribution = _attribution(args)
    server_spans = attribution is None and color_wanted(args.color)  # the orchestrator attributes the text
    unattributed = False  # text that came without spans: printed plain
    final: pb.GenerateStreamResponse | None = None
    seen = PartialStats()
    call = client.stream(args.prompt, **options, text_spans=server_spans)
    try:
        for chunk in call:
            seen.push(chunk)
            if attribution is not None:
                sys.stdout.write(colored(attribution.push(chunk.token_ids, chunk.from_draft, chunk.text)))
            elif server_spans and chunk.spans:
                sys.stdout.write(colored([(span.text, span.from_draft) for span in chunk.spans]))
            else:
                unattributed = unattributed or (server_spans and bool(chunk.text))
                sys.stdout.write(chunk.text)
            sys.stdout.flush()
            if chunk.finish_reason:
                final = chunk
    except KeyboardInterrupt:  # Ctrl-C: what came so far, and the request cancelled on the server
        call.cancel()
        if attribution is not None:
            sys.stdout.write(RESET)
        print(f"\n{seen.line()}")
        return INTERRUPTED
    finally:
        if attribution is not None:
            sys.stdout.write(RESET)  # every run resets itself; this covers an interrupted write
    sys.stdout.write("\n")
    if attribution is not None and not attribution.agrees:
        print(f"specdec: the tokenizer in {args.tokenizer} decodes the tokens differently from the server; "
              "the text from there on is not coloured", file=sys.stderr)
    if unattributed:
        print("specdec: the orchestrator sent part of the text without saying who wrote it (one older than "
              "text spans, or text its tokenizer decodes unusually); that part is not coloured", file=sys.stderr)
    if final is not None:
        print(format_stats(final.stats, final.finish_reason))
    return 0


def _attribution(args: argparse.Namespace) -> TextAttribution | None:
    """The client-side attribution of --color, when colour applies and a tokenizer is given
    (without one, the orchestrator's text spans are used)."""
    if not color_wanted(args.color) or not args.tokenizer:
        return None
    from specdec_core.errors import CheckpointError
    from specdec_core.tokenizer import load_tokenizer

    try:
        return TextAttribution(load_tokenizer(args.tokenizer))
    except CheckpointError as error:
        print(f"specdec: --color: {error}; printing plain text", file=sys.stderr)
        return None


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole > 0 else "-"


def format_status(status: pb.StatusResponse) -> str:
    """A table: one row per replica, with this orchestrator's sessions on it and the replica's
    live load as of the orchestrator's last health check ("-" while it is not serving or not
    read yet: every worker reports a cache budget, so a zero budget means no reading)."""
    rows = [("role", "address", "health", "sessions", "ours", "cache used", "cache free", "fit", "kv", "steps/s",
             "last error")]
    for r in status.replicas:
        known = r.healthy and r.cache_memory_bytes > 0
        rows.append((
            r.role, r.address, "serving" if r.healthy else "down",
            str(r.live_sessions) if known else "-", str(r.active_sessions),
            f"{format_bytes(r.cache_bytes_used)} ({_percent(r.cache_bytes_used, r.cache_memory_bytes)})"
            if known else "-",
            format_bytes(max(0, r.cache_memory_bytes - r.cache_bytes_used)) if known else "-",
            str(r.typical_sessions_free) if known else "-",
            (f"{r.kv_bits}-bit" if r.kv_bits else "dtype") if known else "-",
            f"{r.steps_per_s:.1f}" if known else "-", r.last_error or "",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.append(f"{status.active_generations}/{status.max_generations} generations in flight; sessions = "
                 "open on the replica (every orchestrator), ours = this orchestrator's, cache used = bytes "
                 "its sessions' caches hold (share of its --cache-memory), cache free = what is left, fit = more "
                 f"sessions of a typical size ({TYPICAL_PROMPT_TOKENS}-token prompt, {TYPICAL_DECODER_POSITIONS} "
                 "decoder positions) that fit, kv = its K/V cache's bits (--kv-bits; dtype: the model's)")
    return "\n".join(lines)


INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def describe_error(error: grpc.RpcError, address: str) -> str:
    """One line a person can act on; nothing listening at the address says how to start it."""
    details = error.details() or ""
    if error.code() == grpc.StatusCode.UNAVAILABLE and details.startswith("failed to connect"):
        return (f"specdec: nothing answers at {address}; start the services with scripts/up (from the "
                "repository root), or pass --address HOST:PORT of a running orchestrator")
    if error.code() == grpc.StatusCode.UNAVAILABLE and details.startswith("errors resolving"):
        return f"specdec: cannot resolve the host of {address}; check --address HOST:PORT"
    return f"specdec: {error.code().name}: {details}"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    client = SpecdecClient(args.address, token=args.token, tls_ca=args.tls_ca, timeout=args.timeout)
    try:
        if args.command == "generate":
            code = _generate(args, client)
        elif args.watch is not None:
            try:
                watch(client.status, args.watch, args.count, sys.stdout)
            except KeyboardInterrupt:  # the way out of a live view: not an error
                print(file=sys.stderr)
            code = 0
        else:
            status = client.status()
            if args.json:
                print(json.dumps(MessageToDict(status, preserving_proto_field_name=True,
                                               always_print_fields_with_no_presence=True), indent=2))
            else:
                print(format_status(status))
            code = 0
    except grpc.RpcError as error:
        print(describe_error(error, args.address), file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\nspecdec: interrupted", file=sys.stderr)
        code = INTERRUPTED
    finally:
        client.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
