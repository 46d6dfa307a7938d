"""Security: loopback by default, TLS to the orchestrator, mutual TLS and bearer tokens between
orchestrator and workers, a bearer token for clients, unguessable session ids.

Certificates are made per test session with the ``cryptography`` package: a throwaway CA, a
server certificate for 127.0.0.1/localhost, a client certificate, and a second, untrusted CA.
Servers are configured from their command-line flags (parsed, then started in-process).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import LoopThread, RunningOrchestrator, Worker, start_worker_in

from orchestrator.client import SpecdecClient
from orchestrator.replicas import StartupError
from orchestrator.server import OrchestratorConfig, start_orchestrator
from orchestrator.server import build_parser as orchestrator_parser
from specdec_grpc.security import Security
from specdec_grpc.worker import WorkerConfig
from specdec_grpc.worker import build_parser as worker_parser
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

CODE = grpc.StatusCode
PROMPT = "Return a new dictionary"
TOKEN = "orchestrator-clients-token"
WORKER_TOKEN = "orchestrator-to-workers-token"

pytestmark = pytest.mark.timeout(120)


# -- certificates ----------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path  # CA certificate (PEM) that signed server and client
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # a CA nobody trusts, and a client certificate it signed
    rogue_cert: Path
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple | None, usage: str) -> x509.Certificate:
    """A certificate for ``key``: self-signed CA when ``issuer`` is None, else signed by (key, cert)."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[1].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if usage == "ca":
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        if usage == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
    signer = issuer[0] if issuer else key
    return builder.sign(signer, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
           ) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "server", "client", "rogue_ca", "rogue")}
    ca = _issue("specdec test CA", keys["ca"], None, "ca")
    rogue_ca = _issue("rogue CA", keys["rogue_ca"], None, "ca")
    ca_path, _ = _write(directory, "ca", ca, keys["ca"])
    rogue_ca_path, _ = _write(directory, "rogue_ca", rogue_ca, keys["rogue_ca"])
    server = _write(directory, "server", _issue("localhost", keys["server"], (keys["ca"], ca), "server"), keys["server"])
    client = _write(directory, "client", _issue("orchestrator", keys["client"], (keys["ca"], ca), "client"),
                    keys["client"])
    rogue = _write(directory, "rogue", _issue("orchestrator", keys["rogue"], (keys["rogue_ca"], rogue_ca), "client"),
                   keys["rogue"])
    return Pki(ca_path, *server, *client, rogue_ca_path, *rogue)


# -- servers, configured from their flags ------------------------------------------------------------



@pytest.fixture
def servers(loop: LoopThread, near_draft_dir: Path, target_dir: Path):  # type: ignore[no-untyped-def]
    """``workers(flags)`` starts a draft and a target with the given worker flags;
    ``orchestrator(drafts, targets, flags)`` an orchestrator; all stopped at the end."""
    started: list = []

    def workers(flags: list[str]) -> tuple[Worker, Worker]:
        pair = []
        for role, model in (("draft", near_draft_dir), ("target", target_dir)):
            args = worker_parser(role).parse_args(["--model", str(model), "--port", "0", *flags])
            worker = start_worker_in(loop, role, model, security=Security.from_args(args))
            started.append(worker)
            pair.append(worker)
        return pair[0], pair[1]

    def orchestrator(draft: Worker, target: Worker, flags: list[str]) -> RunningOrchestrator:
        args = orchestrator_parser().parse_args(
            ["--draft", draft.address, "--target", target.address, "--port", "0", "--connect-timeout", "3", *flags]
        )
        running, pool, orch = loop.call(start_orchestrator(OrchestratorConfig.from_args(args)))
        started.append(RunningOrchestrator(loop, running, pool, orch))
        return started[-1]

    yield workers, orchestrator
    for server in reversed(started):
        server.stop()


def tls_channel(address: str, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
                ) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, credentials)


def draft_info(channel: grpc.Channel, metadata: tuple = ()) -> pb.InfoResponse:
    with channel:
        return pb_grpc.DraftStub(channel).Info(pb.InfoRequest(), timeout=5, metadata=metadata)


def rejected(call, code: grpc.StatusCode) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


# -- binding ---------------------------------------------------------------------------------------


def other_local_address() -> str | None:
    """A non-loopback IPv4 address of this host, if it has one."""
    candidates = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            candidates.add(probe.getsockname()[0])
        except OSError:
            pass
    try:
        candidates.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    except OSError:
        pass
    others = sorted(a for a in candidates if not ipaddress.ip_address(a).is_loopback)
    return others[0] if others else None


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def probe_addresses() -> list[str]:
    """Addresses of this host other than 127.0.0.1: a non-loopback interface, and 127.0.0.2
    where all of 127/8 is loopback (Linux). Each is kept only if a listener on the wildcard
    address answers through it, so a refused connection there means "not listening on it"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as control:
        control.bind(("0.0.0.0", 0))
        control.listen()
        port = control.getsockname()[1]
        return [address for address in (other_local_address(), "127.0.0.2")
                if address is not None and reachable(address, port)]


def test_every_service_binds_loopback_by_default(servers) -> None:
    """Services started from bare command lines answer on 127.0.0.1 and on no other address
    of this host."""
    assert orchestrator_parser().parse_args([]).host == "127.0.0.1"
    for role in ("draft", "target"):
        assert worker_parser(role).parse_args([]).host == "127.0.0.1"
    assert WorkerConfig(role="draft", model="m").host == "127.0.0.1"
    assert OrchestratorConfig(drafts=[], targets=["t"]).host == "127.0.0.1"

    workers, orchestrator = servers
    draft, target = workers([])
    orch = orchestrator(draft, target, [])
    ports = [draft.running.port, target.running.port, orch.running.port]
    for port in ports:
        assert reachable("127.0.0.1", port)
    probes = probe_addresses()
    if not probes:
        pytest.skip("no other address of this host reaches a wildcard listener (the defaults were checked)")
    for address in probes:
        for port in ports:
            assert not reachable(address, port), f"a service listens on {address}:{port}, not only loopback"


# -- TLS and tokens --------------------------------------------------------------------------------


def test_orchestrator_over_tls(servers, pki: Pki) -> None:
    workers, orchestrator = servers
    draft, target = workers([])
    orch = orchestrator(draft, target, ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)])
    with SpecdecClient(orch.address, tls_ca=str(pki.ca), timeout=30) as client:
        assert client.generate(PROMPT, max_tokens=8).stats.tokens == 8
        assert len(list(client.stream(PROMPT, max_tokens=8))) >= 1
    with SpecdecClient(orch.address, timeout=5) as plaintext:
        rejected(lambda: plaintext.generate(PROMPT, max_tokens=8), CODE.UNAVAILABLE)
    with SpecdecClient(orch.address, tls_ca=str(pki.rogue_ca), timeout=5) as wrong_ca:
        rejected(lambda: wrong_ca.generate(PROMPT, max_tokens=8), CODE.UNAVAILABLE)


def test_mutual_tls_between_orchestrator_and_workers(servers, pki: Pki) -> None:
    workers, orchestrator = servers
    draft, target = workers(["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                             "--tls-client-ca", str(pki.ca)])
    with_cert = ["--worker-tls-ca", str(pki.ca), "--worker-tls-cert", str(pki.client_cert),
                 "--worker-tls-key", str(pki.client_key)]
    orch = orchestrator(draft, target, with_cert)
    with SpecdecClient(orch.address, timeout=30) as client:
        response = client.generate(PROMPT, max_tokens=8, num_draft=3)
    assert response.stats.tokens == 8 and response.stats.proposed > 0

    # Workers require a client certificate their CA signed: anyone else is turned away.
    assert draft_info(tls_channel(draft.address, pki.ca, pki.client_cert, pki.client_key)).role == "draft"
    rejected(lambda: draft_info(tls_channel(draft.address, pki.ca)), CODE.UNAVAILABLE)
    rejected(lambda: draft_info(tls_channel(draft.address, pki.ca, pki.rogue_cert, pki.rogue_key)),
             CODE.UNAVAILABLE)
    rejected(lambda: draft_info(grpc.insecure_channel(draft.address)), CODE.UNAVAILABLE)
    with pytest.raises(StartupError, match="no target replica answered"):
        orchestrator(draft, target, ["--worker-tls-ca", str(pki.ca)])  # TLS, but no client certificate


def test_bearer_token_required_by_the_orchestrator(servers, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    workers, orchestrator = servers
    draft, target = workers([])
    orch = orchestrator(draft, target, ["--auth-token-file", str(token_file)])
    with SpecdecClient(orch.address, token=TOKEN, timeout=30) as client:
        assert client.generate(PROMPT, max_tokens=8).stats.tokens == 8
        assert list(client.stream(PROMPT, max_tokens=8))[-1].finish_reason == "length"
        assert client.status().max_generations > 0
    for token in (None, "wrong", TOKEN + "x", ""):
        with SpecdecClient(orch.address, token=token, timeout=5) as client:
            details = rejected(lambda c=client: c.generate(PROMPT, max_tokens=8), CODE.UNAUTHENTICATED)
            assert "bearer token" in details
            rejected(lambda c=client: c.stream(PROMPT, max_tokens=8), CODE.UNAUTHENTICATED)
            rejected(lambda c=client: c.status(), CODE.UNAUTHENTICATED)
    # Health stays open, so load balancers and the orchestrator's watch need no secret.
    with grpc.insecure_channel(orch.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert draft.host.snapshot()["live_sessions"] == 0  # refused calls never reached a worker


def test_workers_accept_only_the_orchestrator_with_their_token(servers, tmp_path: Path) -> None:
    workers, orchestrator = servers
    draft, target = workers(["--auth-token", WORKER_TOKEN])
    token_file = tmp_path / "worker-token"
    token_file.write_text(WORKER_TOKEN)
    orch = orchestrator(draft, target, ["--worker-token-file", str(token_file)])
    with SpecdecClient(orch.address, timeout=30) as client:
        response = client.generate(PROMPT, max_tokens=8, num_draft=3)
    assert response.stats.tokens == 8 and response.stats.proposed > 0
    assert all(r.healthy for r in client_status(orch).replicas)  # the health watch works without a token

    rejected(lambda: draft_info(grpc.insecure_channel(draft.address)), CODE.UNAUTHENTICATED)
    rejected(lambda: draft_info(grpc.insecure_channel(draft.address), (("authorization", "Bearer nope"),)),
             CODE.UNAUTHENTICATED)
    with grpc.insecure_channel(draft.address) as channel:
        stub = pb_grpc.DraftStub(channel)
        rejected(lambda: stub.OpenSession(pb.OpenSessionRequest(prompt_ids=[5, 1]), timeout=5), CODE.UNAUTHENTICATED)
        step = pb.ProposeRequest(session_id="x", expected_length=1, num_draft=1)
        rejected(lambda: list(stub.ProposeStream(iter([step]), timeout=5)), CODE.UNAUTHENTICATED)
    for flags in ([], ["--worker-token", "wrong"]):
        with pytest.raises(StartupError, match="UNAUTHENTICATED"):
            orchestrator(draft, target, flags)


def client_status(orch: RunningOrchestrator) -> pb.StatusResponse:
    with SpecdecClient(orch.address, timeout=5) as client:
        return client.status()


# -- session ids -----------------------------------------------------------------------------------


def test_session_ids_are_unguessable(loop: LoopThread, near_draft_dir: Path) -> None:
    draft = start_worker_in(loop, "draft", near_draft_dir)
    try:
        with grpc.insecure_channel(draft.address) as channel:
            stub = pb_grpc.DraftStub(channel)
            ids = []
            for i in range(1000):
                session_id = stub.OpenSession(pb.OpenSessionRequest(prompt_ids=[3 + i % 400, 1]), timeout=10).session_id
                ids.append(session_id)
                stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=10)
    finally:
        draft.stop()
    assert len(set(ids)) == 1000
    # URL-safe base64 of >= 128 random bits, no structure: no shared prefixes, every symbol in use.
    for session_id in ids:
        assert len(base64.urlsafe_b64decode(session_id + "=" * (-len(session_id) % 4))) * 8 >= 128
    ordered = sorted(ids)
    longest_shared_prefix = max(
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        for a, b in zip(ordered, ordered[1:], strict=False)
    )
    assert longest_shared_prefix <= 4  # ~2 expected among 1000 random ids
    symbols = Counter("".join(ids))
    expected = sum(symbols.values()) / 64
    assert len(symbols) == 64 and max(symbols.values()) < 1.5 * expected and min(symbols.values()) > 0.5 * expected


def _scrape(port: int, pki: Pki, cert: Path | None = None, key: Path | None = None) -> str:
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=context, timeout=10) as response:
        return response.read().decode()


def test_metrics_under_mutual_tls_need_a_client_certificate(loop: LoopThread, draft_dir: Path, pki: Pki) -> None:
    """A worker with --tls-client-ca: its /metrics, like its gRPC port, answers only a client
    whose certificate the CA signed."""
    flags = ["--model", str(draft_dir), "--port", "0", "--tls-cert", str(pki.server_cert), "--tls-key",
             str(pki.server_key), "--tls-client-ca", str(pki.ca)]
    args = worker_parser("draft").parse_args(flags)
    worker = start_worker_in(loop, "draft", draft_dir, security=Security.from_args(args), metrics_port=0)
    try:
        port = worker.running.metrics_port
        assert port is not None
        assert "specdec_" in _scrape(port, pki, pki.client_cert, pki.client_key)
        for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):
            with pytest.raises(OSError):  # the TLS handshake is refused (ssl.SSLError / URLError)
                _scrape(port, pki, cert, key)
    finally:
        worker.stop()


def test_a_worker_token_guards_metrics_too_and_its_scheme_is_matched_in_any_case(loop: LoopThread,
                                                                                 draft_dir: Path) -> None:
    """With --auth-token, /metrics answers only a scraper that sends the token as every gRPC call
    must (401 otherwise: Prometheus' ``authorization`` setting sends it); the scheme's name is
    case-insensitive (RFC 7235) on both, the token is not."""
    import urllib.error
    import urllib.request

    args = worker_parser("draft").parse_args(["--model", str(draft_dir), "--port", "0", "--auth-token", TOKEN])
    worker = start_worker_in(loop, "draft", draft_dir, security=Security.from_args(args), metrics_port=0)

    def scrape(header: str | None) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{worker.running.metrics_port}/metrics")
        if header is not None:
            request.add_header("Authorization", header)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            assert error.headers["WWW-Authenticate"].startswith("Bearer")
            return error.code, error.read().decode()

    try:
        for header in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN}"):
            status, text = scrape(header)
            assert status == 200 and "specdec_worker_live_sessions" in text, header
            assert draft_info(grpc.insecure_channel(worker.address), (("authorization", header),)).role == "draft"
        for header in (None, "Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN.upper()}", f"Bearer{TOKEN}"):
            status, text = scrape(header)
            assert status == 401 and "specdec_" not in text, header
            if header is not None:
                rejected(lambda h=header: draft_info(grpc.insecure_channel(worker.address), (("authorization", h),)),
                         CODE.UNAUTHENTICATED)
    finally:
        worker.stop()
