"""Configuration precedence (flags > env > file > defaults), --print-config, and the CLI against a server."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from embtrain import cli
from embtrain_server import config as config_mod
from embtrain_server.main import main as server_main
from tests.conftest import ServerHandle


def test_precedence(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "c.yaml"
    f.write_text("port: 6000\nmetrics_port: 7000\ndevice: cpu\nworkers: 3\n")
    cfg, _ = config_mod.load(["--config", str(f)], env={})
    assert (cfg.port, cfg.metrics_port, cfg.workers) == (6000, 7000, 3)
    cfg, _ = config_mod.load(["--config", str(f)], env={"EMBTRAIN_PORT": "6100", "EMBTRAIN_WORKERS": "5"})
    assert (cfg.port, cfg.metrics_port, cfg.workers) == (6100, 7000, 5)
    cfg, _ = config_mod.load(["--config", str(f), "--port", "6200"], env={"EMBTRAIN_PORT": "6100"})
    assert cfg.port == 6200
    cfg, _ = config_mod.load([], env={"EMBTRAIN_CONFIG": str(f), "EMBTRAIN_INSECURE": "true"})
    assert cfg.port == 6000 and cfg.insecure
    cfg, _ = config_mod.load(["--no-persist"], env={"EMBTRAIN_PERSIST": "1"})
    assert cfg.persist is False
    assert config_mod.load([], env={})[0] == config_mod.ServerConfig()


@pytest.mark.parametrize("argv,env,fragment", [
    (["--port", "x"], {}, "--port: expected int"),
    (["--device", "tpu"], {}, "device: expected auto, cpu, cuda or cuda:N"),
    ([], {"EMBTRAIN_WORKERS": "-1"}, "workers: expected >= 0"),
    (["--tls-cert", "a.pem"], {}, "tls_cert and tls_key"),
])
def test_bad_configuration_is_refused(argv, env, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=fragment):
        config_mod.load(argv, env=env)


def test_unknown_file_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "c.yaml"
    f.write_text("prot: 1\n")
    with pytest.raises(ValueError, match="unknown key 'prot'"):
        config_mod.load(["--config", str(f)], env={})


def test_print_config(capsys) -> None:  # type: ignore[no-untyped-def]
    assert server_main(["--print-config", "--port", "1234", "--tokens", "a:0123456789abcdef"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["port"] == 1234 and printed["tokens"] == "<redacted>"
    assert set(printed) == {f.name for f in config_mod.fields(config_mod.ServerConfig)}


def test_refuses_public_address_without_auth() -> None:
    proc = subprocess.run([sys.executable, "-m", "embtrain_server.main", "--host", "0.0.0.0", "--port", "0",
                           "--metrics-port", "0", "--no-persist", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in proc.stderr
    assert "--insecure" in proc.stderr


def test_cli_health_and_losses(server: ServerHandle, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["--target", server.target, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli.main(["--target", server.target, "losses"]) == 0
    out = capsys.readouterr().out
    for name in ("batch_hard_triplet", "triplet_margin", "island", "torch.MSELoss"):
        assert name in out
    assert cli.main(["--target", server.target, "losses", "batch_hard_triplet"]) == 0
    assert "margin: float = 0.3" in capsys.readouterr().out
    assert cli.main(["health", "--target", server.target, "--timeout", "5"]) == 0
    capsys.readouterr()
    assert cli.main(["--target", "127.0.0.1:1", "--timeout", "1", "health"]) == 4
