"""Start, stop and inspect a local specdec cluster: ``scripts/up``, ``scripts/down``, ``scripts/status``.

``up`` starts N drafts and M targets on free ports (they print their port), waits until
each reports SERVING, then starts the orchestrator on ``--port`` (default 50051) and waits
for it too. Every service serves Prometheus metrics on a free port (``--metrics-port 0``).
Logs, pids, addresses and metrics addresses go to a run directory (default ``runs/current``);
``down`` stops exactly the processes recorded there, by pid; a tensor-parallel target
(``--target-tp N``) is a process group (rank 0 and the ranks it started), stopped as a group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec_tools.service_process import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = REPO_ROOT / "runs" / "current"
DEMO_DRAFT = REPO_ROOT / "models" / "demo-draft"
DEMO_TARGET = REPO_ROOT / "models" / "demo-target"


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


def _start(run_dir: Path, name: str, role: str, args: list[str], host: str) -> dict:
    """Start one service in a session of its own (it outlives this command), logging to the run dir."""
    service = ServiceProcess(role, args, run_dir / f"{name}.log", cwd=REPO_ROOT, new_session=True)
    return {"role": role, "name": name, "pid": service.pid, "argv": service.argv, "log": str(service.log),
            "host": host, "_service": service}


def up(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if (run_dir / "cluster.json").exists() and _alive(json.loads((run_dir / "cluster.json").read_text())):
        print(f"a cluster is already running from {run_dir}; run scripts/down first", file=sys.stderr)
        return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    members: list[dict] = []
    extra = ["--log-level", args.log_level, "--metrics-port", "0"]
    try:
        for role, count, model in (("draft", args.drafts, args.draft_model), ("target", args.targets, args.target_model)):
            for i in range(count):
                service_args = ["--model", str(model), "--host", args.host, "--port", "0", *extra]
                if role == "draft" and getattr(args, "draft_method", "model") != "model":
                    service_args += ["--method", args.draft_method]
                tensor_parallel = role == "target" and getattr(args, "target_tp", 1) > 1
                if tensor_parallel:
                    service_args += ["--tensor-parallel", str(args.target_tp)]
                members.append(_start(run_dir, f"{role}-{i}", role, service_args, args.host))
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
        if args.tokenizer:
            service_args += ["--tokenizer", str(args.tokenizer)]
        orchestrator = _start(run_dir, "orchestrator", "orchestrator", service_args, args.host)
        members.append(orchestrator)
        port = orchestrator["_service"].wait_port(args.timeout)
        orchestrator["address"] = f"{args.host}:{port}"
        orchestrator["metrics_address"] = orchestrator["_service"].metrics_address
        wait_serving(orchestrator["address"], args.timeout)
        _print_started(orchestrator)
    except (RuntimeError, OSError) as error:
        print(f"scripts/up failed: {error}", file=sys.stderr)
        _stop([m for m in members if "pid" in m], grace=5)
        return 1
    finally:
        records = [{k: v for k, v in m.items() if not k.startswith("_")} for m in members]
        (run_dir / "cluster.json").write_text(json.dumps(records, indent=2))
    address = members[-1]["address"]
    print(f"\nspecdec is up (logs and pids in {run_dir}). Try:\n"
          f"  specdec generate \"spell 704316\" --address {address}\n"
          f"  specdec status --address {address}\n"
          f"  scripts/down")
    return 0


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
    for record in ordered:
        try:  # reap our own children when up() failed midway
            os.waitpid(record["pid"], os.WNOHANG)
        except ChildProcessError:
            pass


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


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="where logs and pids live")
    return parser


def up_main(argv: list[str] | None = None) -> None:
    parser = _parser("Start drafts, targets and an orchestrator in the background.")
    parser.add_argument("--drafts", type=int, default=1, help="draft replicas (default 1)")
    parser.add_argument("--targets", type=int, default=1, help="target replicas (default 1)")
    parser.add_argument("--draft-model", default=str(DEMO_DRAFT), help="default: the bundled demo draft")
    parser.add_argument("--draft-method", choices=["model", "ngram", "hybrid"], default="model",
                        help="how the drafts propose (specdec-draft --method): model (default), ngram (prompt "
                             "lookup, no weights: --draft-model gives the tokenizer), hybrid")
    parser.add_argument("--target-model", default=str(DEMO_TARGET), help="default: the bundled demo target")
    parser.add_argument("--target-tp", type=int, default=1, metavar="N",
                        help="split each target over N ranks on this machine (specdec-target "
                             "--tensor-parallel N: a loopback MLX ring; default 1, one process)")
    parser.add_argument("--tokenizer", help="tokenizer directory for the orchestrator (default: the target's)")
    parser.add_argument("--host", default="127.0.0.1", help="interface every process binds")
    parser.add_argument("--port", type=int, default=50051, help="orchestrator port (workers pick free ports)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each process")
    parser.add_argument("--log-level", default="INFO")
    sys.exit(up(parser.parse_args(argv)))


def down_main(argv: list[str] | None = None) -> None:
    parser = _parser("Stop the processes scripts/up started (by pid).")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds before SIGKILL")
    sys.exit(down(parser.parse_args(argv)))


def status_main(argv: list[str] | None = None) -> None:
    sys.exit(status(_parser("Show the processes scripts/up started.").parse_args(argv)))


if __name__ == "__main__":
    commands = {"up": up_main, "down": down_main, "status": status_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m specdec_tools.cluster {up|down|status} [options]")
    commands[sys.argv[1]](sys.argv[2:])
