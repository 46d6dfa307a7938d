"""Start, stop and inspect a local specdec cluster: ``scripts/up``, ``scripts/down``, ``scripts/status``.

``up`` checks what it can before it starts anything (each model directory exists, the
orchestrator's port is free), starts N drafts and M targets on free ports (they print their
port), waits until each reports SERVING, then starts the orchestrator on ``--port`` (default
50051) and waits for it too. Every service serves Prometheus metrics on a free port
(``--metrics-port 0``). ``--draft-args``/``--target-args``/``--worker-args``/``--orchestrator-args``
pass further flags to those services. Ctrl-C while it starts stops what it started. The commands
it prints at the end run as printed from the repository root.
Logs, pids, addresses and metrics addresses go to a run directory (default ``runs/current``);
``down`` stops exactly the processes recorded there, by pid; a tensor-parallel target
(``--target-tp N``) is a process group (rank 0 and the ranks it started), stopped as a group.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec_core.model_names import missing_model
from specdec_grpc.ports import port_problem
from specdec_tools.service_process import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = REPO_ROOT / "runs" / "current"
DEMO_DRAFT = REPO_ROOT / "models" / "demo-draft"
DEMO_TARGET = REPO_ROOT / "models" / "demo-target"
DEMO_PROMPT = "spell 704316"  # a number the demo pair never saw in training
# For a pair of your own: a task every T5 checkpoint (t5-*, flan-t5-*) was trained on.
T5_PROMPT = "translate English to German: The house is wonderful."


def wait_serving(address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{address} did not report SERVING within {timeout:g}s")


def _start(members: list[dict], run_dir: Path, name: str, role: str, args: list[str], host: str) -> dict:
    """Start one service in a session of its own (it outlives this command), logging to the run dir,
    and add it to ``members``. A Ctrl-C is held until it is there: one that came between the start
    and the record left a service nobody stopped."""
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: held.append(number))
    try:
        service = ServiceProcess(role, args, run_dir / f"{name}.log", cwd=REPO_ROOT, new_session=True)
        members.append({"role": role, "name": name, "pid": service.pid, "argv": service.argv,
                        "log": str(service.log), "host": host, "_service": service})
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
    return members[-1]


def shown(path: str | Path) -> str:
    """A path as a command printed for the repository root takes it: relative inside, else absolute."""
    absolute = Path(path).absolute()
    try:
        return shlex.quote(str(absolute.relative_to(REPO_ROOT)))
    except ValueError:
        return shlex.quote(str(absolute))


def specdec_command() -> str:
    """The ``specdec`` next to this Python (``.venv/bin/specdec``: not on the PATH unless the venv
    is activated), or this Python running its module."""
    script = Path(sys.executable).with_name("specdec")
    return shown(script) if script.exists() else f"{shown(sys.executable)} -m orchestrator.cli"


def _as_given(model: str) -> str:
    """A local path as the user typed it, from where they typed it (the services run in the
    repository root); a hub name as it is."""
    return str(Path(model).absolute()) if Path(model).exists() else str(model)


def problems_before_start(args: argparse.Namespace) -> list[str]:
    """What would fail once the services load (minutes for a large model), found now."""
    problems = [f"--{flag}: {problem}" for flag, model in (("draft-model", args.draft_model),
                                                          ("target-model", args.target_model))
                if (problem := missing_model(model))]
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        problems.append(f"--tokenizer {args.tokenizer}: no such directory")
    if args.targets < 1:
        problems.append("--targets must be >= 1 (a cluster needs a target)")
    if args.drafts < 0:
        problems.append("--drafts must be >= 0 (0: the target alone)")
    if (problem := port_problem(args.host, args.port)) is not None:
        problems.append(f"--port {args.port}: cannot bind {args.host}:{args.port}: {problem}; "
                        f"pick another (e.g. --port {args.port + 1}) or run scripts/down first")
    for flag in ("worker_args", "draft_args", "target_args", "orchestrator_args"):
        try:
            shlex.split(getattr(args, flag))
        except ValueError as error:
            problems.append(f"--{flag.replace('_', '-')}: {error}")
    return problems


def up(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if (run_dir / "cluster.json").exists() and _alive(json.loads((run_dir / "cluster.json").read_text())):
        default = run_dir.absolute() == DEFAULT_RUN_DIR
        down = "scripts/down" + ("" if default else f" --run-dir {shown(run_dir)}")
        print(f"a cluster is already running from {run_dir}; run {down} first", file=sys.stderr)
        return 1
    problems = problems_before_start(args)
    for problem in problems:
        print(f"scripts/up: {problem}", file=sys.stderr)
    if problems:
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    members: list[dict] = []
    extra = ["--log-level", args.log_level, "--metrics-port", "0"]
    interrupted = False
    try:
        for role, count, model in (("draft", args.drafts, args.draft_model), ("target", args.targets, args.target_model)):
            for i in range(count):
                service_args = ["--model", _as_given(model), "--host", args.host, "--port", "0", *extra]
                if role == "draft" and getattr(args, "draft_method", "model") != "model":
                    service_args += ["--method", args.draft_method]
                tensor_parallel = role == "target" and getattr(args, "target_tp", 1) > 1
                if tensor_parallel:
                    service_args += ["--tensor-parallel", str(args.target_tp)]
                # Passed-through flags last: on a flag given twice, the service takes the last.
                service_args += [*shlex.split(args.worker_args), *shlex.split(getattr(args, f"{role}_args"))]
                _start(members, run_dir, f"{role}-{i}", role, service_args, args.host)
                members[-1]["process_group"] = tensor_parallel  # pid is the group's id (new session)
        for member in members:
            port = member["_service"].wait_port(args.timeout)
            member["address"] = f"{args.host}:{port}"
            member["metrics_address"] = member["_service"].metrics_address
            wait_serving(member["address"], args.timeout)
            _print_started(member)
        service_args = ["--host", args.host, "--port", str(args.port), *extra]
        for member in members:
            service_args += [f"--{member['role']}", member["address"]]
        if args.drafts == 0:
            service_args.append("--no-draft")
        if args.tokenizer:
            service_args += ["--tokenizer", _as_given(args.tokenizer)]
        service_args += shlex.split(args.orchestrator_args)
        orchestrator = _start(members, run_dir, "orchestrator", "orchestrator", service_args, args.host)
        port = orchestrator["_service"].wait_port(args.timeout)
        orchestrator["address"] = f"{args.host}:{port}"
        orchestrator["metrics_address"] = orchestrator["_service"].metrics_address
        wait_serving(orchestrator["address"], args.timeout)
        _print_started(orchestrator)
    except (RuntimeError, OSError) as error:
        print(f"scripts/up failed: {error}", file=sys.stderr)
        _stop([m for m in members if "pid" in m], grace=5)
        return 1
    except KeyboardInterrupt:  # the services run in sessions of their own: Ctrl-C reaches only us
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        print(f"\nscripts/up: interrupted; stopping the {len(members)} process(es) it started",
              file=sys.stderr)
        _stop([m for m in members if "pid" in m], grace=5)
        return 130
    finally:
        records = [{k: v for k, v in m.items() if not k.startswith("_")} for m in members]
        state = run_dir / "cluster.json"
        if interrupted:
            state.unlink(missing_ok=True)
        else:
            state.write_text(json.dumps(records, indent=2))
    print(f"\nspecdec is up (logs and pids in {run_dir}). Try, from the repository root:\n"
          + "".join(f"  {command}\n" for command in next_commands(args, members[-1]["address"])), end="")
    return 0


def next_commands(args: argparse.Namespace, address: str) -> list[str]:
    """What to run next, each as it runs from the repository root: the demo prompt only for the
    demo pair, the run directory only when it is not the default."""
    specdec = specdec_command()
    demo = Path(args.target_model).absolute() == DEMO_TARGET
    prompt = shlex.quote(DEMO_PROMPT if demo else T5_PROMPT)
    run_dir = "" if Path(args.run_dir).absolute() == DEFAULT_RUN_DIR else f" --run-dir {shown(args.run_dir)}"
    return [f"{specdec} generate {prompt} --address {address}",
            f"{specdec} status --address {address}",
            f"scripts/down{run_dir}"]


def _metrics_url(record: dict) -> str:
    address = record.get("metrics_address")
    return f"http://{address}/metrics" if address else "-"


def _print_started(member: dict) -> None:
    print(f"  {member['name']:<12} {member['address']:<22} pid {member['pid']:<8} metrics {_metrics_url(member)}")


def _is_ours(pid: int, argv: list[str]) -> bool:
    """True if pid still runs the command we started (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False
        return True  # no /proc (macOS): the pid is alive; trust the record
    return any(Path(argv[0]).name.encode() in part for part in cmdline)


def _alive(records: list[dict]) -> list[dict]:
    return [r for r in records if _is_ours(r["pid"], r["argv"])]


def _group_left(record: dict) -> bool:
    """True if a tensor-parallel target's group has members although its rank 0 is gone (the
    group id is rank 0's pid, which no new process gets while the group exists)."""
    if not record.get("process_group"):
        return False
    try:
        os.kill(record["pid"], 0)
        return False  # rank 0 itself is alive: handled by pid
    except ProcessLookupError:
        pass
    except PermissionError:
        return False
    try:
        os.killpg(record["pid"], 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _signal(record: dict, sig: signal.Signals) -> None:
    """The recorded process, or with ``process_group`` its whole group (every rank)."""
    try:
        if record.get("process_group"):
            os.killpg(record["pid"], sig)
        else:
            os.kill(record["pid"], sig)
    except ProcessLookupError:
        pass


KILL_WAIT_S = 10.0  # after SIGKILL, how long to wait for the processes to be gone


def _stop(records: list[dict], grace: float) -> None:
    # Orchestrator first, so it stops sending work before the workers drain.
    ordered = sorted(records, key=lambda r: r.get("role") != "orchestrator")
    for record in ordered:
        if _is_ours(record["pid"], record["argv"]) or _group_left(record):
            _signal(record, signal.SIGTERM)
    deadline = time.monotonic() + grace

    def running() -> list[dict]:
        return [r for r in ordered if _is_ours(r["pid"], r["argv"]) or _group_left(r)]

    while time.monotonic() < deadline and running():
        time.sleep(0.1)
    for record in running():
        print(f"  {record['name']} (pid {record['pid']}) did not stop in {grace:g}s; killing it", file=sys.stderr)
        _signal(record, signal.SIGKILL)
    # A killed process is gone only once the kernel has torn it down (seconds for one holding
    # gigabytes): wait for that, and reap our own children (up() failed midway or was interrupted).
    gone_by = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < gone_by and (_reap(ordered) or running()):
        time.sleep(0.05)


def _reap(records: list[dict]) -> bool:
    """Reap whichever of ``records`` are our exited children; True if one of our children still runs."""
    waiting = False
    for record in records:
        try:
            pid, _ = os.waitpid(record["pid"], os.WNOHANG)
        except ChildProcessError:  # not our child, or reaped already
            continue
        waiting = waiting or pid == 0
    return waiting


def down(args: argparse.Namespace) -> int:
    state = Path(args.run_dir) / "cluster.json"
    if not state.exists():
        print(f"nothing to stop: no {state}")
        return 0
    records = json.loads(state.read_text())
    alive = _alive(records)
    _stop(records, grace=args.grace)
    state.unlink()
    print(f"stopped {len(alive)} process(es) started from {args.run_dir}")
    return 0


def status(args: argparse.Namespace) -> int:
    state = Path(args.run_dir) / "cluster.json"
    if not state.exists():
        print(f"no cluster recorded in {args.run_dir}")
        return 1
    records = json.loads(state.read_text())
    healthy = True
    for record in records:
        alive = _is_ours(record["pid"], record["argv"])
        serving = "-"
        if alive and record.get("address"):
            try:
                wait_serving(record["address"], 2.0)
                serving = "SERVING"
            except RuntimeError:
                serving = "NOT SERVING"
        healthy &= alive and serving == "SERVING"
        print(f"  {record['name']:<12} {record.get('address', '?'):<22} pid {record['pid']:<8} "
              f"{'running' if alive else 'DEAD':<8} {serving:<12} metrics {_metrics_url(record)}")
    return 0 if healthy else 1


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR),
                        help="where logs and pids live "
                             f"(default {DEFAULT_RUN_DIR.relative_to(REPO_ROOT)} in the repository)")
    return parser


def build_up_parser() -> argparse.ArgumentParser:
    parser = _parser("scripts/up", "Start drafts, targets and an orchestrator in the background.")
    parser.add_argument("--drafts", type=int, default=1,
                        help="draft replicas; 0 runs the target alone (default 1)")
    parser.add_argument("--targets", type=int, default=1, help="target replicas (default 1)")
    parser.add_argument("--draft-model", default=str(DEMO_DRAFT),
                        help="checkpoint directory or hub name "
                             "(default models/demo-draft, the bundled demo draft)")
    parser.add_argument("--draft-method", choices=["model", "ngram", "hybrid"], default="model",
                        help="how the drafts propose (specdec-draft --method): model (default), ngram (prompt "
                             "lookup, no weights: --draft-model gives the tokenizer), hybrid")
    parser.add_argument("--target-model", default=str(DEMO_TARGET),
                        help="checkpoint directory or hub name (default models/demo-target, the bundled demo "
                             "target)")
    parser.add_argument("--target-tp", type=int, default=1, metavar="N",
                        help="split each target over N ranks on this machine (specdec-target "
                             "--tensor-parallel N: a loopback MLX ring; default 1, one process)")
    parser.add_argument("--tokenizer", help="tokenizer directory for the orchestrator (default: the target's)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface every process binds (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051,
                        help="orchestrator port; workers pick free ports (default 50051)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for each process to serve (default 300)")
    parser.add_argument("--log-level", default="INFO", help="every service's --log-level (default INFO)")
    for flag, to in (("worker", "every draft and target"), ("draft", "every draft (specdec-draft)"),
                     ("target", "every target (specdec-target)"), ("orchestrator", "the orchestrator")):
        parser.add_argument(f"--{flag}-args", default="", metavar="FLAGS",
                            help=f"more flags for {to}, one quoted string, e.g. "
                                 + ('"--max-batch 32 --watchdog-s 120"' if flag != "orchestrator"
                                    else '"--max-generations 64"')
                                 + " (default none; up's own --model, --host, --port and --metrics-port "
                                   "come first, so a flag given here wins)")
    return parser


def build_down_parser() -> argparse.ArgumentParser:
    parser = _parser("scripts/down", "Stop the processes scripts/up started (by pid).")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds before SIGKILL (default 15)")
    return parser


def build_status_parser() -> argparse.ArgumentParser:
    return _parser("scripts/status", "Show the processes scripts/up started.")


def up_main(argv: list[str] | None = None) -> None:
    sys.exit(up(build_up_parser().parse_args(argv)))


def down_main(argv: list[str] | None = None) -> None:
    sys.exit(down(build_down_parser().parse_args(argv)))


def status_main(argv: list[str] | None = None) -> None:
    sys.exit(status(build_status_parser().parse_args(argv)))


if __name__ == "__main__":
    commands = {"up": up_main, "down": down_main, "status": status_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m specdec_tools.cluster {up|down|status} [options]")
    commands[sys.argv[1]](sys.argv[2:])
