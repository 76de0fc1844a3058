"""Security and limits over real gRPC: bearer tokens and principals, session ownership, TLS and mutual TLS, the
refusal to listen unauthenticated on a non-loopback address, the metrics address, and the resource limits
(sessions per principal, concurrent streams, batches in flight per stream, deadlines and cancellation, keepalive
and connection age)."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import queue
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import replace

import grpc
import numpy as np
import pytest

import embtrain
from embtrain.v1 import embtrain_pb2 as pb
from embtrain.v1 import embtrain_pb2_grpc as pb_grpc
from embtrain_server import auth as auth_mod
from embtrain_server import config as config_mod
from embtrain_server import losses
from embtrain_server import server as srv
from embtrain_server.main import main as server_main
from tests.conftest import LossGate, ServerHandle, wait_until

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef0"
TOKENS = f"alice:{ALICE},bob:{BOB}"


def batch(n: int = 16, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    y = np.repeat(np.arange(n // 4), 4)
    return (g.standard_normal((n, d)) + y[:, None]).astype(np.float32), y.astype(np.int64)


# ---- authentication ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def authed() -> Iterator[ServerHandle]:
    from tests.conftest import base_config
    h = ServerHandle(base_config(tokens=TOKENS))
    yield h
    h.stop()


def _calls(c: embtrain.Client) -> dict[str, Callable[[], object]]:
    x, y = batch()
    return {
        "Compute": lambda: c.compute(x, y, loss="batch_hard_triplet"),
        "ComputeStream": lambda: list(c.compute_stream([(x, y)], loss="batch_hard_triplet")),
        "CreateSession": lambda: c.create_session("batch_hard_triplet"),
        "ListSessions": lambda: c.list_sessions(),
        "ListLosses": lambda: c.losses(),
        "GetSession": lambda: c.get_session("whatever"),
    }


@pytest.mark.parametrize("token,fragment", [
    (None, "authorization: missing"),
    ("not-a-known-token-at-all", "authorization: unknown token"),
    (ALICE[:-1], "authorization: unknown token"),  # a prefix of a real token
    (ALICE + "x", "authorization: unknown token"),
])
@pytest.mark.parametrize("method", ["Compute", "ComputeStream", "CreateSession", "ListSessions", "ListLosses",
                                    "GetSession"])
def test_every_rpc_needs_a_known_token(authed: ServerHandle, token: str | None, fragment: str,
                                       method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBTRAIN_TOKEN", raising=False)
    with authed.client(token=token) as c:
        with pytest.raises(embtrain.Unauthenticated) as info:
            _calls(c)[method]()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.message.startswith(fragment), info.value.message
        assert info.value.fields == ["authorization"]
        # health needs no token
        assert c.health() == "SERVING"


@pytest.mark.parametrize("header", ["Basic " + ALICE, ALICE, "Bearer", "Bearer ", "bearer" + ALICE])
def test_malformed_authorization_header(authed: ServerHandle, header: str) -> None:
    with grpc.insecure_channel(authed.target) as ch:
        stub = pb_grpc.EmbeddingTrainerStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListLosses(pb.ListLossesRequest(), metadata=(("authorization", header),), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization" in info.value.details()
        # the scheme is case-insensitive
        assert stub.ListLosses(pb.ListLossesRequest(), metadata=(("authorization", "bEaReR " + ALICE),),
                               timeout=10).losses


def test_token_from_the_environment_of_the_client(authed: ServerHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBTRAIN_TOKEN", BOB)
    with authed.client() as c:
        s = c.create_session("batch_hard_triplet")
    with authed.client(token=BOB) as c:
        assert s.id in {i.session_id for i in c.list_sessions()}
        c.get_session(s.id).close()


def test_tokens_from_file_and_environment_name_principals(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# principal:token\n\ncarol: carol-token-0123456789abcdef\n  dave:dave-token-0123456789abcdef  \n")
    cfg, _ = config_mod.load(["--token-file", str(f), "--port", "0", "--metrics-port", "0", "--no-persist",
                              "--device", "cpu"], env={"EMBTRAIN_TOKENS": TOKENS})
    h = ServerHandle(replace(cfg, host="127.0.0.1"))
    try:
        owners = {}
        for name, token in [("carol", "carol-token-0123456789abcdef"), ("dave", "dave-token-0123456789abcdef"),
                            ("alice", ALICE), ("bob", BOB)]:
            with h.client(token=token) as c:
                owners[name] = c.create_session("batch_hard_triplet").id
        for name, token in [("carol", "carol-token-0123456789abcdef"), ("alice", ALICE)]:
            with h.client(token=token) as c:
                assert [i.session_id for i in c.list_sessions()] == [owners[name]]
    finally:
        h.stop()


@pytest.mark.parametrize("text,fragment", [
    ("alice", "expected 'principal:token'"),
    (":sometoken-0123456789", "expected 'principal:token'"),
    ("alice:short", "shorter than 16 characters"),
    ("a:same-token-0123456789\nb:same-token-0123456789", "also the token of 'a'"),
])
def test_bad_token_files_are_refused_with_the_line(tmp_path: pathlib.Path, text: str, fragment: str) -> None:
    f = tmp_path / "tokens"
    f.write_text(text)
    with pytest.raises(ValueError, match=fragment) as info:
        auth_mod.load_tokens(str(f), "")
    assert str(f) in str(info.value)


def test_authenticator_compares_every_token() -> None:
    a = auth_mod.Authenticator({ALICE: "alice", BOB: "bob"})
    assert a.principal([("authorization", f"Bearer {ALICE}")]) == "alice"
    assert a.principal([("authorization", f"Bearer {BOB}".encode())]) == "bob"
    assert a.principal([("x-other", "1"), ("authorization", f"Bearer  {BOB} ")]) == "bob"
    assert auth_mod.Authenticator({}).principal([]) == auth_mod.ANONYMOUS
    with pytest.raises(auth_mod.Unauthenticated):
        a.principal([("authorization", "Bearer " + "\u00e9" * 20)])


# ---- ownership ----------------------------------------------------------------------------------------------

def test_sessions_are_invisible_to_other_principals(authed: ServerHandle) -> None:
    x, y = batch()
    with authed.client(token=ALICE) as alice, authed.client(token=BOB) as bob:
        s = alice.create_session("batch_hard_triplet", head={"type": "linear", "out_dim": 4}, seed=1)
        s.compute(x, y)
        before = s.info()
        weights = s.export_model().weights
        missing = "0" * len(s.id)
        for sid in (s.id, missing):
            bs = embtrain.Session(bob, sid)
            attempts: list[Callable[[], object]] = [
                bs.info, lambda: bs.compute(x, y), lambda: list(bs.stream([(x, y)])), lambda: bs.embed(x),
                bs.export_model, bs.save_checkpoint, bs.close]
            messages = []
            for attempt in attempts:
                with pytest.raises(embtrain.NotFound) as info:
                    attempt()
                assert info.value.fields == ["session_id"]
                messages.append(info.value.message.replace(sid, "<id>"))
            if sid == s.id:
                owned_messages = messages
        assert owned_messages == messages  # another's session looks exactly like a missing one
        assert s.id not in {i.session_id for i in bob.list_sessions()}
        assert s.id in {i.session_id for i in alice.list_sessions()}
        after = s.info()
        assert (after.step, after.last_checkpoint_step) == (before.step, before.last_checkpoint_step) == (1, -1)
        assert s.export_model().weights == weights
        s.close()


# ---- TLS ----------------------------------------------------------------------------------------------------

def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: pathlib.Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_leaf(d: pathlib.Path, name: str, ca: str, ext: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_leaf(d, "client2", "ca", "extendedKeyUsage=clientAuth\n")
    _make_leaf(d, "rogue-client", "other-ca", "extendedKeyUsage=clientAuth\n")
    return d


def _tls_client(h: ServerHandle, certs: pathlib.Path, ca: str = "ca", client: str | None = None,
                **kwargs: object) -> embtrain.Client:
    extra = {} if client is None else {"certificate_chain": str(certs / f"{client}.pem"),
                                       "private_key": (certs / f"{client}.key").read_bytes()}
    return embtrain.Client(h.target, root_certificates=str(certs / f"{ca}.pem"), timeout=10, **extra,
                           **kwargs)  # type: ignore[arg-type]


def test_tls(make_server, certs: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                                  tokens=TOKENS)
    x, y = batch()
    with _tls_client(h, certs, token=ALICE) as c:
        assert c.health() == "SERVING"
        assert np.isfinite(c.compute(x, y, loss="batch_hard_triplet").loss)
        assert c.create_session("contrastive").id in {s.session_id for s in c.list_sessions()}
    with _tls_client(h, certs) as c:  # TLS does not replace the token
        with pytest.raises(embtrain.Unauthenticated):
            c.losses()
    with _tls_client(h, certs, ca="other-ca", token=ALICE) as c:  # a server certificate we do not trust
        with pytest.raises(embtrain.Unavailable):
            c.losses()
    with embtrain.Client(h.target, token=ALICE, timeout=5) as c:  # plaintext to a TLS port
        with pytest.raises(embtrain.Unavailable):
            c.losses()


def test_mutual_tls(make_server, certs: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                                  tls_client_ca=str(certs / "ca.pem"))
    x, y = batch()
    with _tls_client(h, certs, client="client") as c:
        assert c.health() == "SERVING"
        assert np.isfinite(c.compute(x, y, loss="batch_hard_triplet").loss)
    for client in (None, "rogue-client"):  # no client certificate, or one from a CA the server does not trust
        with _tls_client(h, certs, client=client) as c:
            with pytest.raises(embtrain.Unavailable):
                c.losses()
            with pytest.raises(embtrain.Unavailable):
                c.health()


def test_client_certificates_name_principals(make_server, certs: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """Under mutual TLS without tokens the certificate's common name is the principal; and mutual TLS counts as
    authentication for a non-loopback address."""
    h: ServerHandle = make_server(host="0.0.0.0", tls_cert=str(certs / "server.pem"),
                                  tls_key=str(certs / "server.key"), tls_client_ca=str(certs / "ca.pem"))
    with _tls_client(h, certs, client="client") as one, _tls_client(h, certs, client="client2") as two:
        s = one.create_session("batch_hard_triplet")
        assert [i.session_id for i in one.list_sessions()] == [s.id]
        assert two.list_sessions() == []
        with pytest.raises(embtrain.NotFound):
            two.get_session(s.id)
        s2 = two.create_session("contrastive")
        assert [i.session_id for i in two.list_sessions()] == [s2.id]


def test_tls_configuration_is_checked() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        config_mod.load(["--tls-key", "k.pem"], env={})
    with pytest.raises(ValueError, match="tls_client_ca: needs tls_cert"):
        config_mod.load(["--tls-client-ca", "ca.pem"], env={})


# ---- exposure -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
                                           ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                           ("::", False), ("", False), ("10.1.2.3", False),
                                           ("example.com", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert srv.is_loopback(host) is loopback


def test_non_loopback_without_auth_is_refused_unless_insecure(make_server, caplog) -> None:  # type: ignore[no-untyped-def]
    argv = ["--host", "0.0.0.0", "--port", "0", "--metrics-port", "0", "--no-persist", "--device", "cpu"]
    with caplog.at_level(logging.ERROR, logger="embtrain.server"):
        assert server_main(argv) == 2
    text = caplog.text
    assert "refusing to listen on 0.0.0.0 without authentication" in text
    assert "--token-file" in text and "--insecure" in text and "--tls-client-ca" in text
    # with --insecure, or with tokens, it starts
    h: ServerHandle = make_server(host="0.0.0.0", insecure=True)
    with embtrain.Client(f"127.0.0.1:{h.running.port}") as c:
        assert c.health() == "SERVING"
    h2: ServerHandle = make_server(host="0.0.0.0", tokens=TOKENS)
    with embtrain.Client(f"127.0.0.1:{h2.running.port}") as c:
        with pytest.raises(embtrain.Unauthenticated):
            c.losses()


def test_metrics_address_is_configurable(make_server) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(host="127.0.0.1", metrics_host="127.0.0.2", metrics_port=-1)
    text = urllib.request.urlopen(f"http://127.0.0.2:{h.running.metrics_port}/metrics", timeout=10).read()
    assert b"embtrain_requests_total" in text or b"embtrain_open_sessions" in text
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{h.running.metrics_port}/metrics", timeout=5)
    off: ServerHandle = make_server(metrics_port=0)
    assert off.running.metrics_port == 0


# ---- limits -------------------------------------------------------------------------------------------------

def test_sessions_per_principal(make_server) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(tokens=TOKENS, max_sessions_per_principal=2)
    with h.client(token=ALICE) as alice, h.client(token=BOB) as bob:
        first = [alice.create_session("batch_hard_triplet") for _ in range(2)]
        with pytest.raises(embtrain.ResourceExhausted) as info:
            alice.create_session("batch_hard_triplet")
        assert info.value.fields == ["sessions"] and "limit per principal" in info.value.message
        assert len(alice.list_sessions()) == 2
        bob.create_session("batch_hard_triplet")  # the limit is per principal
        first[0].close()
        alice.create_session("batch_hard_triplet")


class RawStream:
    """A ComputeStream driven by hand: put requests, read answers."""

    def __init__(self, target: str, metadata: tuple = ()) -> None:
        self.channel = grpc.insecure_channel(target)
        self.q: queue.Queue[pb.ComputeRequest | None] = queue.Queue()
        stub = pb_grpc.EmbeddingTrainerStub(self.channel)
        self.call = stub.ComputeStream(iter(self.q.get, None), metadata=metadata, timeout=60)

    def send(self, req: pb.ComputeRequest) -> None:
        self.q.put(req)

    def recv(self) -> pb.ComputeResponse:
        return next(self.call)

    def close(self) -> None:
        self.q.put(None)
        self.call.cancel()
        self.channel.close()


def request(x: np.ndarray, y: np.ndarray, rid: str, session_id: str | None = None) -> pb.ComputeRequest:
    from embtrain import codec
    req = pb.ComputeRequest(request_id=rid)
    if session_id:
        req.session_id = session_id
    else:
        req.loss.name = "batch_hard_triplet"
    req.inputs["embeddings"].CopyFrom(codec.encode(x))
    req.inputs["labels"].CopyFrom(codec.encode(y))
    return req


def test_concurrent_streams_limit(make_server) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(max_concurrent_streams=2)
    x, y = batch()
    streams = [RawStream(h.target) for _ in range(2)]
    try:
        for i, s in enumerate(streams):
            s.send(request(x, y, f"r{i}"))
            assert s.recv().request_id == f"r{i}"
        assert h.running.servicer.open_streams == 2
        with h.client() as c:
            with pytest.raises(embtrain.ResourceExhausted) as info:
                list(c.compute_stream([(x, y)], loss="batch_hard_triplet"))
            assert info.value.fields == ["streams"]
            assert np.isfinite(c.compute(x, y, loss="batch_hard_triplet").loss)  # unary calls are not limited
            streams[0].close()
            wait_until(lambda: h.running.servicer.open_streams == 1, what="the closed stream to be released")
            assert len(list(c.compute_stream([(x, y)], loss="batch_hard_triplet"))) == 1
    finally:
        for s in streams:
            s.close()


def session_gate(h: ServerHandle, session_id: str) -> LossGate:
    """A ``LossGate`` on the session's loss class."""
    with h.client() as c:
        return LossGate(c.get_session(session_id).info().loss)


def gauge(h: ServerHandle, name: str) -> float:
    """A gauge's value on the server's own metrics registry."""
    value = h.running.metrics.registry.get_sample_value(name)
    assert value is not None, f"no metric {name}"
    return value


def test_batches_in_flight_per_stream_are_bounded(make_server) -> None:  # type: ignore[no-untyped-def]
    k = 3
    h: ServerHandle = make_server(max_inflight_per_stream=k)
    with h.client() as c:
        sid = c.create_session("batch_hard_triplet").id
    gate = session_gate(h, sid)
    s = RawStream(h.target)
    try:  # the gate opens in any case, so a failure does not leave a worker blocked
        for i in range(12):
            x, y = batch(seed=i)
            s.send(request(x, y, f"r{i}", sid))
        assert gate.entered.wait(30)
        wait_until(lambda: gauge(h, "embtrain_stream_pending_batches") == k, what=f"{k} batches read ahead")
        time.sleep(0.3)  # the client has sent all 12; the server must not read further while none is answered
        assert gauge(h, "embtrain_stream_pending_batches") == k
        gate.open()
        answers = [s.recv() for _ in range(12)]
        assert [a.request_id for a in answers] == [f"r{i}" for i in range(12)]
        assert [a.step for a in answers] == list(range(1, 13))
        assert not any(a.HasField("error") for a in answers)
        wait_until(lambda: gauge(h, "embtrain_stream_pending_batches") == 0, what="the window to empty")
    finally:
        gate.open()
        s.close()


def test_an_expired_request_that_has_not_started_never_runs(make_server) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server()
    scheduler = h.running.scheduler
    x, y = batch()
    with h.client(timeout=30) as c:
        s = c.create_session("batch_hard_triplet")
        gate = session_gate(h, s.id)
        first: list[object] = []
        t = threading.Thread(target=lambda: first.append(s.compute(x, y)))
        t.start()
        try:
            assert gate.entered.wait(30)
            # the second batch waits for the first (same session) and its deadline passes while it waits
            with pytest.raises(embtrain.DeadlineExceeded):
                c.compute(x, y, session_id=s.id, timeout=0.3)
            wait_until(lambda: gauge(h, "embtrain_worker_calls") == 1, what="only the running batch to hold a worker")
        finally:
            gate.open()
        t.join(30)
        assert first and first[0].step == 1  # type: ignore[attr-defined]
        wait_until(lambda: gauge(h, "embtrain_worker_calls") == 0 and not scheduler.busy(s.id), what="resources freed")
        assert gate.calls == 1
        assert s.info().step == 1
        assert s.compute(x, y).step == 2  # the session goes on


def test_a_cancelled_running_batch_keeps_the_session_order(make_server) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server()
    scheduler = h.running.scheduler
    x, y = batch()
    with h.client(timeout=30) as c:
        s = c.create_session("batch_hard_triplet", head={"type": "linear", "out_dim": 4}, seed=3)
        gate = session_gate(h, s.id)
        try:
            with pytest.raises(embtrain.DeadlineExceeded):
                s.compute(x, y, timeout=0.3)
            assert gate.entered.wait(30)  # the worker runs the batch (the first one also builds the head)
            time.sleep(0.2)
            # the worker still runs the batch: the session stays locked, so nothing can overlap it
            assert scheduler.busy(s.id) and gauge(h, "embtrain_worker_calls") == 1
        finally:
            gate.open()
        wait_until(lambda: gauge(h, "embtrain_worker_calls") == 0 and not scheduler.busy(s.id), what="the batch to end")
        # its caller was gone: the computation stopped at its next block, and nothing was applied
        assert s.info().step == 0
        assert s.compute(x, y).step == 1


def test_connection_options_are_applied() -> None:
    cfg = config_mod.ServerConfig(max_connection_age_seconds=12.5, max_connection_age_grace_seconds=3,
                                  keepalive_time_seconds=7, keepalive_timeout_seconds=2, max_message_bytes=1234)
    opts = dict(srv.grpc_options(cfg))
    assert opts["grpc.max_connection_age_ms"] == 12500
    assert opts["grpc.max_connection_age_grace_ms"] == 3000
    assert opts["grpc.keepalive_time_ms"] == 7000
    assert opts["grpc.keepalive_timeout_ms"] == 2000
    assert opts["grpc.max_receive_message_length"] == opts["grpc.max_send_message_length"] == 1234


def test_max_connection_age_recycles_connections(make_server) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(max_connection_age_seconds=0.5, max_connection_age_grace_seconds=0.5)
    x, y = batch()
    # a stream outliving age + grace is ended by the server
    with h.client() as c:
        def slow() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for _ in range(100):
                yield x, y
                time.sleep(0.05)
        with pytest.raises(embtrain.Unavailable):
            for _ in c.compute_stream(slow(), loss="batch_hard_triplet", max_in_flight=1):
                pass
    # unary calls on one client go on across the recycled connections: 40 calls at least 50 ms apart span more
    # than two connection ages plus grace, so some of them run on a connection the server opened after a recycle
    with h.client() as c:
        for _ in range(40):
            assert np.isfinite(c.compute(x, y, loss="batch_hard_triplet").loss)
            time.sleep(0.05)
    assert gauge(h, "embtrain_open_streams") == 0


def test_stream_ends_promptly_when_the_server_drains(make_server) -> None:  # type: ignore[no-untyped-def]
    """An idle stream (no batch in flight) is ended at once by a graceful stop, not after the drain timeout (an
    hour here: the stop finishing within the guard below proves the stream did not hold it)."""
    h: ServerHandle = make_server(drain_seconds=3600)
    x, y = batch()
    s = RawStream(h.target)
    s.send(request(x, y, "r0"))
    assert s.recv().request_id == "r0"
    fut = asyncio.run_coroutine_threadsafe(h.running.stop(3600), h.loop)
    with pytest.raises(grpc.RpcError) as info:
        s.recv()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    fut.result(timeout=120)
    h.loop.call_soon_threadsafe(h.loop.stop)
    h.thread.join(10)
    s.close()


def test_requests_are_admitted_against_the_server_wide_budget(make_server) -> None:  # type: ignore[no-untyped-def]
    """A request whose bytes alone exceed the memory budget is refused before it is queued; twenty concurrent
    requests whose bytes together exceed it wait for each other and are all answered; nothing stays admitted."""
    h: ServerHandle = make_server(memory_budget_bytes=700 * 1024)
    rng = np.random.default_rng(0)
    with h.client() as c:
        big = rng.standard_normal((1500, 128)).astype(np.float32)  # ~770 KB
        with pytest.raises(embtrain.ResourceExhausted) as info:
            c.compute(big, np.arange(1500) % 4, loss="batch_hard_triplet")
        assert info.value.fields == ["request"]
        x = rng.standard_normal((100, 128)).astype(np.float32)  # ~52 KB: 13 fit in the budget at once
        results: list[Any] = []
        threads = [threading.Thread(target=lambda: results.append(
            c.compute(x, np.arange(100) % 4, loss="batch_hard_triplet"))) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 20 and all(np.isfinite(r.loss) for r in results)
    assert gauge(h, "embtrain_admitted_request_bytes") == 0


def test_work_estimated_past_the_compute_time_limit_is_refused_up_front(make_server) -> None:  # type: ignore[no-untyped-def]
    """weighted_margin_ranking's matrix form is O(n² log n) with a large constant (every row an anchor): at
    n = 2500 its estimate (about 14 s) exceeds a 1 s limit, and it is refused before it runs; the vector form of
    the same size is O(n²) and runs."""
    h: ServerHandle = make_server(max_compute_seconds=1.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2500, 8)).astype(np.float32)
    gt = np.abs(rng.standard_normal((2500, 2500))).astype(np.float32)
    with h.client() as c:
        with pytest.raises(embtrain.ResourceExhausted) as info:
            c.compute(x, loss="weighted_margin_ranking", gt_distances=gt)
        assert info.value.fields == ["inputs.embeddings"] and "max_compute_seconds" in info.value.message
        r = c.compute(x, loss="weighted_margin_ranking", gt_distances=gt[0, 1:])
        assert np.isfinite(r.loss)


def test_an_expired_call_stops_its_computation_at_the_next_block(make_server) -> None:  # type: ignore[no-untyped-def]
    """A batch of tens of seconds (weighted_margin_ranking's matrix form at n = 4000; no compute-time limit here)
    whose deadline passes gives its worker back within a few blocks (about a second), not when the batch would have
    finished; the bound below is that difference, not a speed target."""
    h: ServerHandle = make_server(max_compute_seconds=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 8)).astype(np.float32)
    gt = np.abs(rng.standard_normal((4000, 4000))).astype(np.float32)
    with h.client() as c:
        with pytest.raises(embtrain.DeadlineExceeded):
            c.compute(x, loss="weighted_margin_ranking", gt_distances=gt, timeout=1.0)
        wait_until(lambda: gauge(h, "embtrain_worker_calls") == 0, timeout=20, what="the worker to stop")
        y = np.arange(8) % 2
        assert np.isfinite(c.compute(x[:8], y, loss="batch_hard_triplet").loss)


def test_cancellation_stops_a_loss_between_its_blocks() -> None:
    """The check itself, without a server: a stopped scope raises Cancelled at the loss's next block."""
    import torch

    from embtrain_server import cancellation, compute, losses

    losses.load_all()
    loss = losses.get("weighted_margin_ranking")({})
    x = torch.randn(50, 4, dtype=torch.float64)
    gt = torch.rand(50, 50, dtype=torch.float64)
    stop = threading.Event()
    stop.set()
    with cancellation.scope(stop), pytest.raises(cancellation.Cancelled):
        compute.run(loss, {"embeddings": x, "gt_distances": gt}, device=torch.device("cpu"))
    with cancellation.scope(threading.Event()):
        assert np.isfinite(compute.run(loss, {"embeddings": x, "gt_distances": gt}, device=torch.device("cpu")).loss)


def test_requests_that_may_carry_large_parameters_are_parsed_on_a_worker(make_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A stateless Compute's loss spec and a CreateSession's configuration can be arbitrarily large Structs:
    they are parsed on a worker thread, never on the event loop that serves every other client."""
    from embtrain_server import servicer as servicer_mod

    threads: list[str] = []
    parse = servicer_mod.Unparsed.parse

    def recording(self):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return parse(self)

    monkeypatch.setattr(servicer_mod.Unparsed, "parse", recording)
    # (Small stateless batches may run on the event loop altogether: inline_compute_seconds; off here.)
    h: ServerHandle = make_server(inline_compute_seconds=0)
    with h.client() as c:
        params = {"margin": 0.3, **{f"unused_{i}": i for i in range(3)}}
        with pytest.raises(embtrain.InvalidArgument, match="unused_0"):
            c.compute(*batch(), loss="batch_hard_triplet", params=params)
        assert np.isfinite(c.compute(*batch(), loss="batch_hard_triplet", params={"margin": 0.3}).loss)
        c.create_session("batch_hard_triplet", {"margin": 0.3})
        results = list(c.compute_stream([batch()], loss="batch_hard_triplet"))
        assert results[0].ok
    assert len(threads) == 4 and all(name.startswith("embtrain-worker") for name in threads), threads


def test_small_stateless_batches_run_on_the_event_loop_and_large_specs_never_do(make_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With the default inline_compute_seconds a small stateless batch arriving at idle workers is parsed, checked
    and computed on the event loop (no thread hand-over), with the same answer as on a worker; a request larger
    than inline_max_bytes (a loss spec may be an arbitrarily large Struct) is still parsed on a worker, and so is a
    batch whose estimated compute time is over the limit, and a pml.* loss (its estimate does not see what PML
    enumerates)."""
    from embtrain_server import batches as batches_mod
    from embtrain_server import servicer as servicer_mod

    parsed: list[str] = []
    ran: list[str] = []
    parse, run = servicer_mod.Unparsed.parse, batches_mod.Batches.run_stateless

    def recording_parse(self):  # type: ignore[no-untyped-def]
        parsed.append(threading.current_thread().name)
        return parse(self)

    def recording_run(self, prepared):  # type: ignore[no-untyped-def]
        ran.append(threading.current_thread().name)
        return run(self, prepared)

    monkeypatch.setattr(servicer_mod.Unparsed, "parse", recording_parse)
    monkeypatch.setattr(batches_mod.Batches, "run_stateless", recording_run)
    x, y = batch()
    h: ServerHandle = make_server()
    off: ServerHandle = make_server(inline_compute_seconds=0)
    with h.client() as c, off.client() as c_off:
        small = c.compute(x, y, loss="batch_hard_triplet", params={"margin": 0.3})
        assert parsed == [h.thread.name] and ran == [h.thread.name], (parsed, ran)  # the server's event loop
        reference = c_off.compute(x, y, loss="batch_hard_triplet", params={"margin": 0.3})
        assert ran[-1].startswith("embtrain-worker")
        assert small.loss == reference.loss
        np.testing.assert_array_equal(small.gradients["embeddings"], reference.gradients["embeddings"])
        np.testing.assert_array_equal(small.triplets, reference.triplets)
        del parsed[:], ran[:]
        big = {"margin": 0.3, "note": "x" * (300 * 1024)}  # over inline_max_bytes: parsed on a worker
        with pytest.raises(embtrain.InvalidArgument, match="note"):
            c.compute(x, y, loss="batch_hard_triplet", params=big)
        assert parsed and parsed[0].startswith("embtrain-worker"), parsed
        del parsed[:], ran[:]
        xl = np.random.default_rng(0).standard_normal((1024, 128)).astype(np.float32)
        yl = np.arange(1024) // 8
        assert np.isfinite(c.compute(xl, yl, loss="batch_hard_triplet").loss)  # estimated over 50 ms: a worker
        assert ran and ran[0].startswith("embtrain-worker"), ran
        del parsed[:], ran[:]
        # A pml.* loss's estimate does not see the triplets PML enumerates: a worker too, whatever its size.
        pytest.importorskip("pytorch_metric_learning")
        assert np.isfinite(c.compute(x, y, loss="pml.TripletMarginLoss").loss)
        assert ran and ran[0].startswith("embtrain-worker"), ran


def test_torch_losses_are_estimated_from_their_own_inputs(make_server) -> None:  # type: ignore[no-untyped-def]
    """CTCLoss with T = S = 12000 from a quarter megabyte builds tables of N x T x (2S + 1) entries (gigabytes): it
    is refused against a 256 MiB budget before it runs; a short sequence of the same kind runs."""
    h: ServerHandle = make_server(memory_budget_bytes=256 * 2**20)

    def ctc(t: int) -> dict[str, np.ndarray]:
        lp = np.log(np.full((t, 1, 2), 0.5, np.float32))
        return {"log_probs": lp, "targets": np.ones((1, t), np.int64), "input_lengths": np.array([t]),
                "target_lengths": np.array([t // 3])}

    with h.client() as c:
        with pytest.raises(embtrain.ResourceExhausted) as info:
            c.compute(loss="torch.CTCLoss", params={"zero_infinity": True}, **ctc(12000))
        assert info.value.fields == ["inputs"]
        assert np.isfinite(c.compute(loss="torch.CTCLoss", params={"zero_infinity": True}, **ctc(60)).loss)


def test_a_sessions_head_counts_in_the_compute_time_estimate(make_server) -> None:  # type: ignore[no-untyped-def]
    """A head of 2000 layers makes a small batch expensive: past a 1 s limit it is refused before it runs and the
    session's width stays free; the same batch on a session without a head runs."""
    h: ServerHandle = make_server(max_compute_seconds=1.0)
    x, y = batch()
    deep = [{"type": "linear", "out_dim": 64}] * 2000
    with h.client() as c:
        s = c.create_session("batch_hard_triplet", head=deep)
        with pytest.raises(embtrain.ResourceExhausted) as info:
            s.compute(np.repeat(x, 16, axis=0), np.repeat(y, 16))
        assert info.value.fields == ["inputs.embeddings"] and s.info().step == 0
        assert c.create_session("batch_hard_triplet").compute(np.repeat(x, 16, axis=0), np.repeat(y, 16)).step == 1


def test_batches_compute_together_only_while_their_working_memory_fits(make_server) -> None:  # type: ignore[no-untyped-def]
    """Three workers, and batches whose estimated working memory is more than half the budget: they compute one at
    a time (never two forwards at once), and all are answered."""
    h: ServerHandle = make_server(workers=3, memory_budget_bytes=4 * 2**20)
    cls = losses.get("batch_hard_triplet")
    original = cls.forward
    lock, running, peak = threading.Lock(), [0], [0]

    def forward(loss, inputs, ctx):  # type: ignore[no-untyped-def]
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.05)  # long enough for the other workers to try
            return original(loss, inputs, ctx)
        finally:
            with lock:
                running[0] -= 1

    cls.forward = forward  # type: ignore[method-assign]
    try:
        x, y = batch(n=256, d=64)
        results: list[Any] = []
        with h.client() as c:
            threads = [threading.Thread(target=lambda: results.append(c.compute(x, y, loss="batch_hard_triplet")))
                       for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        cls.forward = original  # type: ignore[method-assign]
    assert len(results) == 6 and peak[0] == 1
    assert gauge(h, "embtrain_working_memory_bytes") == 0
