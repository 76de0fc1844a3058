"""The server's Unix domain socket (``--unix-socket``) for co-located clients: the same answers, sessions and
authentication as TCP, TLS over the socket, the socket file's life (a stale one replaced, a regular file refused, mode
0600, removed on a graceful stop), and the setting from flag, environment and YAML."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import embtrain
from embtrain import cli
from embtrain_server import config as config_mod
from embtrain_server import process
from embtrain_server import server as srv
from embtrain_server.main import main as server_main
from tests.conftest import ServerHandle, base_config

ALICE = "alice-token-0123456789abcdef"
TOKENS = f"alice:{ALICE}"


@pytest.fixture()
def sock_dir() -> Iterator[pathlib.Path]:
    """A short directory (pytest's tmp paths can pass the 107-byte limit of a socket path)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="embtrain-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def batch(n: int = 32, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    y = np.repeat(np.arange(n // 4), 4)
    return (g.standard_normal((n, d)) + y[:, None]).astype(np.float32), y.astype(np.int64)


def stale_socket(path: pathlib.Path) -> None:
    """A socket file nobody listens on: what a killed server leaves behind."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    assert stat.S_ISSOCK(path.lstat().st_mode)


def test_compute_over_unix_equals_tcp_bit_for_bit(make_server: Callable[..., ServerHandle],
                                                   sock_dir: pathlib.Path) -> None:
    path = sock_dir / "s.sock"
    h = make_server(unix_socket=str(path))
    assert h.running.unix_address == f"unix://{path}"
    assert stat.S_IMODE(path.stat().st_mode) == srv.UNIX_SOCKET_MODE == 0o600
    x, y = batch()
    with h.client() as tcp, embtrain.Client(h.running.unix_address) as uds, \
            embtrain.Client(f"unix:{path}") as uds2:
        assert uds.health() == "SERVING" and uds2.health() == "SERVING"
        want = tcp.compute(x, y, loss="batch_hard_triplet", params={"margin": 0.3})
        for c in (uds, uds2):
            got = c.compute(x, y, loss="batch_hard_triplet", params={"margin": 0.3})
            assert np.isfinite(want.loss) and got.loss == want.loss
            assert got.gradient.tobytes() == want.gradient.tobytes()
            assert np.array_equal(got.triplets, want.triplets)
        assert [r.loss for r in uds.compute_stream([(x, y)] * 3, loss="batch_hard_triplet")] == [want.loss] * 3


def test_relative_socket_path(make_server: Callable[..., ServerHandle], sock_dir: pathlib.Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(sock_dir)
    h = make_server(unix_socket="rel.sock")
    assert h.running.unix_address == "unix:rel.sock"
    with embtrain.Client("unix:rel.sock") as c:
        assert c.health() == "SERVING"
    h.stop()
    assert not (sock_dir / "rel.sock").exists()


def test_sessions_are_shared_between_tcp_and_unix(make_server: Callable[..., ServerHandle],
                                                  sock_dir: pathlib.Path) -> None:
    h = make_server(unix_socket=str(sock_dir / "s.sock"))
    x, y = batch()
    with h.client() as tcp, embtrain.Client(h.running.unix_address) as uds:
        session = tcp.create_session("batch_hard_triplet", {"margin": 0.2})
        assert session.compute(x, y, step=1).step == 1
        assert session.id in {s.session_id for s in uds.list_sessions()}
        assert uds.get_session(session.id).compute(x, y, step=2).step == 2
        assert tcp.get_session(session.id).info().step == 2


def test_token_is_required_over_unix_as_over_tcp(make_server: Callable[..., ServerHandle],
                                                 sock_dir: pathlib.Path) -> None:
    h = make_server(unix_socket=str(sock_dir / "s.sock"), tokens=TOKENS)
    x, y = batch()
    with embtrain.Client(h.running.unix_address, token=None) as c:
        assert c.health() == "SERVING"  # the health service needs no token, as on TCP
        with pytest.raises(embtrain.Unauthenticated):
            c.losses()
        with pytest.raises(embtrain.Unauthenticated):
            c.compute(x, y, loss="batch_hard_triplet")
    with embtrain.Client(h.running.unix_address, token="wrong-token-0123456789abcdef") as c:
        with pytest.raises(embtrain.Unauthenticated):
            c.losses()
    with embtrain.Client(h.running.unix_address, token=ALICE) as c:  # plain metadata: no TLS needed on a socket
        assert np.isfinite(c.compute(x, y, loss="batch_hard_triplet").loss)
        assert c.create_session("contrastive").id in {s.session_id for s in c.list_sessions()}


def test_tls_over_unix(make_server: Callable[..., ServerHandle], sock_dir: pathlib.Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=sock_dir, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, san in (("local", "DNS:localhost"), ("named", "DNS:embtrain.example")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (sock_dir / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    ca = str(sock_dir / "ca.pem")
    x, y = batch()
    # A certificate for localhost: a unix: target checks that name by default.
    h = make_server(unix_socket=str(sock_dir / "local.sock"), tls_cert=str(sock_dir / "local.pem"),
                    tls_key=str(sock_dir / "local.key"), tokens=TOKENS)
    with embtrain.Client(h.running.unix_address, token=ALICE, root_certificates=ca, timeout=10) as c:
        assert np.isfinite(c.compute(x, y, loss="batch_hard_triplet").loss)
    with embtrain.Client(h.running.unix_address, root_certificates=ca, timeout=10) as c:  # TLS is no token
        with pytest.raises(embtrain.Unauthenticated):
            c.losses()
    with embtrain.Client(h.running.unix_address, token=ALICE, timeout=5) as c:  # plaintext to a TLS socket
        with pytest.raises(embtrain.Unavailable):
            c.losses()
    # A certificate for another name: tls_server_name says which.
    h2 = make_server(unix_socket=str(sock_dir / "named.sock"), tls_cert=str(sock_dir / "named.pem"),
                     tls_key=str(sock_dir / "named.key"))
    with embtrain.Client(h2.running.unix_address, root_certificates=ca, timeout=5) as c:
        with pytest.raises(embtrain.Unavailable):
            c.losses()
    with embtrain.Client(h2.running.unix_address, root_certificates=ca, tls_server_name="embtrain.example",
                         timeout=10) as c:
        assert c.health() == "SERVING" and c.losses()


def test_stale_socket_is_replaced_and_removed_on_stop(make_server: Callable[..., ServerHandle],
                                                      sock_dir: pathlib.Path) -> None:
    path = sock_dir / "s.sock"
    stale_socket(path)
    h = make_server(unix_socket=str(path))
    with embtrain.Client(h.running.unix_address) as c:
        assert c.health() == "SERVING"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    h.stop()
    assert not path.exists()


def test_a_regular_file_is_never_replaced(sock_dir: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    path = sock_dir / "s.sock"
    path.write_text("precious")
    with pytest.raises(ValueError, match=r"unix_socket: .*s\.sock' exists and is not a socket; refusing"):
        asyncio.run(srv.start(base_config(unix_socket=str(path))))
    argv = ["--port", "0", "--metrics-port", "0", "--no-persist", "--device", "cpu", "--unix-socket", str(path)]
    with caplog.at_level(logging.ERROR, logger="embtrain.server"):
        assert server_main(argv) == 2
    assert "unix_socket" in caplog.text and "is not a socket" in caplog.text
    assert path.read_text() == "precious"


def test_a_socket_in_use_is_refused(make_server: Callable[..., ServerHandle], sock_dir: pathlib.Path) -> None:
    path = sock_dir / "s.sock"
    h = make_server(unix_socket=str(path))
    with pytest.raises(ValueError, match="unix_socket: .* is in use by a running server"):
        asyncio.run(srv.start(base_config(unix_socket=str(path))))
    with embtrain.Client(h.running.unix_address) as c:  # the first server keeps its socket
        assert c.health() == "SERVING"


def test_serve_logs_the_socket_and_removes_it_on_sigterm(sock_dir: pathlib.Path) -> None:
    path = sock_dir / "s.sock"
    log = sock_dir / "server.log"
    with process.running(["--unix-socket", str(path), "--metrics-port", "0", "--no-persist", "--device", "cpu"],
                         log_path=log) as (target, _):
        assert cli.main(["--target", f"unix://{path}", "health"]) == 0
    assert not path.exists()
    text = log.read_text()
    assert f"listening on {target} and unix://{path} (gRPC)" in text, text


def test_setting_from_flag_env_and_yaml(sock_dir: pathlib.Path) -> None:
    path = str(sock_dir / "s.sock")
    assert config_mod.ServerConfig().unix_socket == ""
    assert config_mod.load(["--unix-socket", path], env={})[0].unix_socket == path
    assert config_mod.load([], env={"EMBTRAIN_UNIX_SOCKET": path})[0].unix_socket == path
    f = sock_dir / "c.yaml"
    f.write_text(f"unix_socket: {path}\n")
    assert config_mod.load(["--config", str(f)], env={})[0].unix_socket == path
    other = str(sock_dir / "t.sock")
    assert config_mod.load(["--config", str(f), "--unix-socket", other],
                           env={"EMBTRAIN_UNIX_SOCKET": path})[0].unix_socket == other


@pytest.mark.parametrize("value,fragment", [
    ("/no/such/dir/s.sock", "unix_socket: the directory '/no/such/dir' does not exist"),
    ("/tmp/" + "x" * 103, "unix_socket: the path is 108 bytes, longer than the 107"),
    ("unix:///tmp/s.sock", "unix_socket: expected a file path"),
    ("/tmp/", "unix_socket: expected a file path, got the directory"),
])
def test_bad_socket_paths_are_refused(value: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        config_mod.load(["--unix-socket", value], env={})


def test_longest_path_fits(sock_dir: pathlib.Path, make_server: Callable[..., ServerHandle]) -> None:
    prefix = f"{sock_dir}/"
    path = prefix + "x" * (config_mod.UNIX_PATH_MAX - len(prefix))
    assert len(path) == 107
    h = make_server(unix_socket=path)
    with embtrain.Client(f"unix://{path}") as c:
        assert c.health() == "SERVING"
    h.stop()
    assert not os.path.exists(path)


def test_exposure_check_treats_the_socket_as_local(make_server: Callable[..., ServerHandle],
                                                   sock_dir: pathlib.Path) -> None:
    h = make_server(unix_socket=str(sock_dir / "s.sock"))  # no tokens, no --insecure: loopback TCP + a socket
    assert not h.config.tokens and not h.config.insecure
    with embtrain.Client(h.running.unix_address) as c:
        assert c.losses()


def test_client_knows_unix_targets() -> None:
    from embtrain._client import is_unix_target
    assert is_unix_target("unix:///tmp/s.sock") and is_unix_target("unix:s.sock")
    assert is_unix_target("unix-abstract:embtrain")
    assert not is_unix_target("127.0.0.1:50051") and not is_unix_target("dns:///unix:1")
