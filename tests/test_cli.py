"""``embtrain`` writing into a pipe whose reader stops early (``embtrain losses | head``) exits quietly, with the
status of a process killed by SIGPIPE, instead of printing a ``BrokenPipeError`` traceback. Real subprocesses and
real pipes against the in-process server."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from tests.conftest import ServerHandle

CLI = [sys.executable, "-m", "embtrain.cli"]
SIGPIPE_STATUS = 141  # 128 + SIGPIPE, what the shell reports for a tool killed by SIGPIPE


def _assert_quiet(stderr: str) -> None:
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr


def test_losses_into_a_pipe_nobody_reads(server: ServerHandle) -> None:
    # The read end is closed before the command starts: its first write meets a broken pipe, deterministically
    # (with a reader that lags, output smaller than the pipe's buffer might all be written before it goes away).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*CLI, "losses", "--target", server.target], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write_end)
    _assert_quiet(proc.stderr)
    assert proc.returncode == SIGPIPE_STATUS


def test_reader_that_stops_after_the_first_line(server: ServerHandle) -> None:
    # --json output is larger than a pipe's buffer, so the command is still writing when the reader closes its end.
    proc = subprocess.Popen([*CLI, "losses", "--json", "--target", server.target], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=120)
    assert first == "[\n"
    _assert_quiet(stderr)
    assert proc.returncode == SIGPIPE_STATUS


def test_piped_into_head(server: ServerHandle) -> None:
    cmd = shlex.join([*CLI, "losses", "--target", server.target])
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -n 1"], capture_output=True, text=True,
                          timeout=120)
    _assert_quiet(proc.stderr)
    assert proc.returncode in (0, SIGPIPE_STATUS)  # 0 when all output fitted in the pipe before head exited
    assert proc.stdout.count("\n") == 1 and "[" in proc.stdout  # `name  [family, ...]`


def test_full_output_still_exits_zero(server: ServerHandle) -> None:
    proc = subprocess.run([*CLI, "losses", "--target", server.target], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "batch_hard_triplet" in proc.stdout
    _assert_quiet(proc.stderr)


# ---- the operator's CLI: sessions, compute, --json, exit statuses --------------------------------------------
# In-process through cli.main(argv) against in-process servers; real processes where the behaviour needs one
# (Ctrl-C). Answers are checked against the SDK's own.

import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import embtrain  # noqa: E402
from embtrain import cli  # noqa: E402

HEAD = [{"type": "linear", "out_dim": 4}]


def _run(capsys, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json(capsys, *argv: str):  # type: ignore[no-untyped-def]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    return json.loads(out)


def _plain(info: embtrain.SessionInfo) -> dict:
    """A SessionInfo as the CLI's JSON gives it."""
    return json.loads(json.dumps(dataclasses.asdict(info)))


@pytest.fixture()
def batch(tmp_path: pathlib.Path) -> dict:
    rng = np.random.default_rng(7)
    X = rng.standard_normal((16, 8)).astype(np.float32)
    y = (np.arange(16) % 4).astype(np.int64)
    C = rng.standard_normal((4, 8)).astype(np.float32)
    paths = {}
    for name, value in (("X", X), ("y", y), ("C", C)):
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], value)
    return {"X": X, "y": y, "C": C, "paths": paths}


@pytest.fixture()
def mclient(module_server: ServerHandle):  # type: ignore[no-untyped-def]
    with module_server.client(timeout=60.0) as c:
        yield c


def test_sessions_list_is_the_default_and_matches_the_sdk(module_server: ServerHandle, mclient, capsys) -> None:  # type: ignore[no-untyped-def]
    a = mclient.create_session("batch_hard_triplet", {"margin": 0.2})
    b = mclient.create_session("island", {"num_classes": 4}, head=HEAD, seed=1)
    t = module_server.target
    code, plain, err = _run(capsys, "--target", t, "sessions")
    assert code == 0, err
    code, listed, err = _run(capsys, "sessions", "list", "--target", t)
    assert code == 0 and listed == plain, err
    lines = {line.split()[0]: line for line in plain.splitlines()}
    assert {a.id, b.id} <= set(lines)
    assert lines[b.id].split()[1:] == ["island", "step", "0", "ready"]
    expected = sorted((_plain(i) for i in mclient.list_sessions()), key=lambda d: d["session_id"])
    # --json before the subcommand, after it, and after the action alike
    for argv in (["--json", "sessions"], ["sessions", "--json"], ["sessions", "list", "--json"]):
        doc = _json(capsys, "--target", t, *argv)
        assert isinstance(doc, list)
        assert sorted(doc, key=lambda d: d["session_id"]) == expected


def test_sessions_show(module_server: ServerHandle, mclient, batch, capsys) -> None:  # type: ignore[no-untyped-def]
    s = mclient.create_session("island", {"num_classes": 4}, head=HEAD, seed=0)
    s.compute(batch["X"], labels=batch["y"])
    t = module_server.target
    assert _json(capsys, "--target", t, "--json", "sessions", "show", s.id) == _plain(s.info())
    code, out, err = _run(capsys, "--target", t, "sessions", "show", s.id)
    assert code == 0, err
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["session_id"] == s.id and fields["step"] == "1" and fields["loss"] == "island"
    assert json.loads(fields["config"])["head"] == [{"type": "linear", "out_dim": 4, "bias": True}]


def test_sessions_close(module_server: ServerHandle, mclient, capsys) -> None:  # type: ignore[no-untyped-def]
    t = module_server.target
    s = mclient.create_session("batch_hard_triplet")
    code, out, err = _run(capsys, "--target", t, "sessions", "close", s.id)
    assert (code, out.strip()) == (0, f"closed {s.id} at step 0"), err
    assert s.id not in {i.session_id for i in mclient.list_sessions()}
    s2 = mclient.create_session("batch_hard_triplet")
    doc = _json(capsys, "--target", t, "sessions", "close", s2.id, "--json")
    assert doc["session_id"] == s2.id and doc["loss"] == "batch_hard_triplet" and doc["step"] == 0
    with pytest.raises(embtrain.NotFound):
        mclient.get_session(s2.id)


def test_sessions_export_writes_what_export_model_returns(module_server: ServerHandle, mclient, batch,  # type: ignore[no-untyped-def]
                                                          tmp_path: pathlib.Path, capsys) -> None:
    s = mclient.create_session("island", {"num_classes": 4}, head=HEAD, seed=3)
    s.compute(batch["X"], labels=batch["y"])
    model = s.export_model()
    out = tmp_path / "export"
    doc = _json(capsys, "--target", module_server.target, "sessions", "export", s.id, "--out", str(out), "--json")
    assert doc["session_id"] == s.id and doc["step"] == model.step == 1
    expected = [out / "config.json", out / "weights.safetensors", out / "state.centers.npy"]
    assert doc["files"] == [str(p) for p in expected]
    assert json.loads((out / "config.json").read_text()) == model.config
    assert (out / "weights.safetensors").read_bytes() == model.weights
    centers = np.load(out / "state.centers.npy")
    assert centers.dtype == model.state["centers"].dtype
    np.testing.assert_array_equal(centers, model.state["centers"])
    # text output names the files too
    code, text, err = _run(capsys, "--target", module_server.target, "sessions", "export", s.id, "--out",
                           str(tmp_path / "again"))
    assert code == 0, err
    assert text.splitlines()[0] == f"exported {s.id} at step 1:"
    assert str(tmp_path / "again" / "weights.safetensors") in text
    assert (tmp_path / "again" / "weights.safetensors").read_bytes() == model.weights


def test_sessions_checkpoint_and_close_keeping_it(make_server: Callable[..., ServerHandle], batch,  # type: ignore[no-untyped-def]
                                                  tmp_path: pathlib.Path, capsys) -> None:
    srv = make_server(persist=True, state_dir=str(tmp_path / "state"))
    with srv.client(timeout=60.0) as c:
        s = c.create_session("island", {"num_classes": 4}, head=HEAD, seed=0)
        s.compute(batch["X"], labels=batch["y"])
        s.compute(batch["X"], labels=batch["y"])
        code, out, err = _run(capsys, "--target", srv.target, "sessions", "checkpoint", s.id)
        assert (code, out) == (0, "2\n"), err
        assert s.info().last_checkpoint_step == 2
        s.compute(batch["X"], labels=batch["y"])
        assert _json(capsys, "--json", "--target", srv.target, "sessions", "checkpoint", s.id) == \
            {"session_id": s.id, "step": 3}
        code, out, err = _run(capsys, "--target", srv.target, "sessions", "close", s.id, "--keep-checkpoint")
        assert (code, out.strip()) == (0, f"closed {s.id} at step 3, checkpoint kept at step 3"), err


def test_checkpoint_without_a_state_dir_is_a_plain_failure(module_server: ServerHandle, mclient, capsys) -> None:  # type: ignore[no-untyped-def]
    s = mclient.create_session("batch_hard_triplet")
    code, out, err = _run(capsys, "--target", module_server.target, "sessions", "checkpoint", s.id)
    assert code == cli.EXIT_FAILURE == 1 and out == ""
    assert err.startswith("embtrain: FAILED_PRECONDITION: ") and "persist" in err


def test_compute_equals_the_sdk(module_server: ServerHandle, mclient, batch, tmp_path: pathlib.Path,  # type: ignore[no-untyped-def]
                                capsys) -> None:
    p, t = batch["paths"], module_server.target
    ref = mclient.compute(batch["X"], labels=batch["y"], loss="batch_hard_triplet", params={"margin": 0.2},
                          per_item_losses=True)
    out = tmp_path / "out"
    doc = _json(capsys, "--target", t, "--json", "compute", "--loss", "batch_hard_triplet", "--params",
                '{"margin": 0.2}', "--embeddings", p["X"], "--labels", p["y"], "--out", str(out))
    assert doc["loss"] == ref.loss  # exactly: JSON floats round-trip
    assert doc["triplets_total"] == ref.triplets_total > 0
    assert doc["stats"] == ref.stats
    written = {"grad.embeddings": ref.gradient, "triplets": ref.triplets, "per_item_losses": ref.per_item_losses}
    assert doc["files"] == [str(out / f"{name}.npy") for name in written]
    for name, value in written.items():
        got = np.load(out / f"{name}.npy")
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)
    # text output: the loss as Python writes it (round-trips), triplets_total, the stats
    code, text, err = _run(capsys, "--target", t, "compute", "--loss", "batch_hard_triplet", "--params",
                           '{"margin": 0.2}', "--embeddings", p["X"], "--labels", p["y"])
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].split() == ["loss", repr(ref.loss)] and float(lines[0].split()[1]) == ref.loss
    assert lines[1].split() == ["triplets_total", str(ref.triplets_total)]
    assert "stats:" in lines and any(line.split()[0] == "mean_d_ap" for line in lines[3:])
    assert "wrote:" not in text


def test_compute_params_from_a_file_and_the_default_params(module_server: ServerHandle, mclient, batch,  # type: ignore[no-untyped-def]
                                                           tmp_path: pathlib.Path, capsys) -> None:
    p, t = batch["paths"], module_server.target
    (tmp_path / "params.json").write_text('{"margin": 0.7}')
    doc = _json(capsys, "--target", t, "compute", "--json", "--loss", "batch_hard_triplet", "--params",
                f"@{tmp_path / 'params.json'}", "--embeddings", p["X"], "--labels", p["y"])
    assert doc["loss"] == mclient.compute(batch["X"], labels=batch["y"], loss="batch_hard_triplet",
                                          params={"margin": 0.7}).loss
    doc = _json(capsys, "--target", t, "compute", "--json", "--loss", "batch_hard_triplet", "--embeddings", p["X"],
                "--labels", p["y"])
    assert doc["loss"] == mclient.compute(batch["X"], labels=batch["y"], loss="batch_hard_triplet").loss
    assert "files" not in doc


def test_compute_named_inputs_write_every_gradient(module_server: ServerHandle, mclient, batch,  # type: ignore[no-untyped-def]
                                                   tmp_path: pathlib.Path, capsys) -> None:
    p = batch["paths"]
    ref = mclient.compute(batch["X"], labels=batch["y"], loss="island", centers=batch["C"], per_item_losses=True)
    assert set(ref.gradients) == {"embeddings", "centers"}
    out = tmp_path / "island"
    doc = _json(capsys, "--target", module_server.target, "--json", "compute", "--loss", "island",
                "--embeddings", p["X"], "--labels", p["y"], "--input", f"centers={p['C']}", "--out", str(out))
    assert doc["loss"] == ref.loss and doc["stats"] == ref.stats
    for name in ("centers", "embeddings"):
        assert str(out / f"grad.{name}.npy") in doc["files"]
        np.testing.assert_array_equal(np.load(out / f"grad.{name}.npy"), ref.gradients[name])
    # a torch loss with no `embeddings` input at all
    np.save(tmp_path / "a.npy", batch["X"])
    np.save(tmp_path / "b.npy", batch["X"][::-1].copy())
    ref = mclient.compute(loss="torch.MSELoss", input=batch["X"], target=batch["X"][::-1].copy())
    doc = _json(capsys, "--target", module_server.target, "--json", "compute", "--loss", "torch.MSELoss",
                "--input", f"input={tmp_path / 'a.npy'}", "--input", f"target={tmp_path / 'b.npy'}")
    assert doc["loss"] == ref.loss and doc["triplets_total"] == 0


def test_compute_in_a_session_trains_it_as_the_sdk_does(module_server: ServerHandle, mclient, batch,  # type: ignore[no-untyped-def]
                                                        capsys) -> None:
    p = batch["paths"]
    via_cli = mclient.create_session("island", {"num_classes": 4}, head=HEAD, seed=5)
    via_sdk = mclient.create_session("island", {"num_classes": 4}, head=HEAD, seed=5)
    for step in (1, 2):
        ref = via_sdk.compute(batch["X"], labels=batch["y"])
        doc = _json(capsys, "--target", module_server.target, "compute", "--session", via_cli.id, "--json",
                    "--embeddings", p["X"], "--labels", p["y"])
        assert doc["loss"] == ref.loss and doc["stats"] == ref.stats
        assert doc["session_id"] == via_cli.id and doc["step"] == ref.step == step
    assert via_cli.export_model().weights == via_sdk.export_model().weights


# ---- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", [["show"], ["close"], ["checkpoint"], ["export", "--out", "OUT"]])
def test_unknown_session_exits_3(module_server: ServerHandle, tmp_path: pathlib.Path, action: list[str],  # type: ignore[no-untyped-def]
                                 capsys) -> None:
    argv = [a.replace("OUT", str(tmp_path / "never")) for a in action]
    code, out, err = _run(capsys, "--target", module_server.target, "sessions", argv[0], "no-such-session", *argv[1:])
    assert code == cli.EXIT_NOT_FOUND == 3
    assert out == ""
    assert err == "embtrain: NOT_FOUND: session_id: no session 'no-such-session'\n"
    assert not (tmp_path / "never").exists()


def test_unknown_session_in_compute_and_unknown_loss(module_server: ServerHandle, batch, capsys) -> None:  # type: ignore[no-untyped-def]
    p, t = batch["paths"], module_server.target
    code, _, err = _run(capsys, "--target", t, "compute", "--session", "nope", "--embeddings", p["X"],
                        "--labels", p["y"])
    assert code == 3 and err.startswith("embtrain: NOT_FOUND: ") and "nope" in err
    code, out, err = _run(capsys, "--target", t, "losses", "no_such_loss")
    assert (code, out) == (3, "") and "no loss named 'no_such_loss'" in err


def test_missing_or_bad_npy_exits_2_naming_the_option(module_server: ServerHandle, batch, tmp_path: pathlib.Path,  # type: ignore[no-untyped-def]
                                                      capsys) -> None:
    p, t = batch["paths"], module_server.target
    missing = str(tmp_path / "missing.npy")
    text = tmp_path / "text.npy"
    text.write_text("not an array\n")
    np.savez(tmp_path / "archive.npz", a=batch["X"])
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [
        (["--embeddings", missing, "--labels", p["y"]], f"embtrain: --embeddings: {missing}: no such file"),
        (["--embeddings", p["X"], "--labels", missing], f"embtrain: --labels: {missing}: no such file"),
        (["--embeddings", p["X"], "--input", f"centers={missing}"], f"embtrain: --input centers: {missing}: "),
        (["--embeddings", str(text)], "embtrain: --embeddings: "),
        (["--embeddings", str(tmp_path / "archive.npz")], "embtrain: --embeddings: "),
        (["--embeddings", p["X"], "--labels", str(tmp_path / "objects.npy")], "embtrain: --labels: "),
        (["--embeddings", p["X"], "--labels", str(tmp_path)], "embtrain: --labels: "),
    ]
    for argv, start in cases:
        code, out, err = _run(capsys, "--target", t, "compute", "--loss", "batch_hard_triplet", *argv)
        assert (code, out) == (cli.EXIT_USAGE, ""), (argv, err)
        assert err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert "not a .npy file" in _run(capsys, "compute", "--loss", "x", "--embeddings", str(text))[2]
    assert "an .npz archive" in _run(capsys, "compute", "--loss", "x", "--embeddings",
                                     str(tmp_path / "archive.npz"))[2]
    assert "dtype object" in _run(capsys, "compute", "--loss", "x", "--embeddings", str(tmp_path / "objects.npy"))[2]


def test_bad_command_lines_exit_2(module_server: ServerHandle, batch, capsys) -> None:  # type: ignore[no-untyped-def]
    p, t = batch["paths"], module_server.target
    cases = [
        (["compute", "--embeddings", p["X"]], "embtrain: --loss: required"),
        (["compute", "--loss", "batch_hard_triplet"], "embtrain: --embeddings: required"),
        (["compute", "--session", "s", "--loss", "island", "--embeddings", p["X"]], "embtrain: --loss: "),
        (["compute", "--loss", "x", "--params", "{margin", "--embeddings", p["X"]], "embtrain: --params: not JSON"),
        (["compute", "--loss", "x", "--params", "[1]", "--embeddings", p["X"]],
         "embtrain: --params: expected a JSON object"),
        (["compute", "--loss", "x", "--input", "centers", "--embeddings", p["X"]],
         "embtrain: --input: expected NAME=FILE.npy"),
        (["compute", "--loss", "x", "--input", f"embeddings={p['X']}", "--embeddings", p["X"]],
         "embtrain: --input: input 'embeddings' given twice"),
        (["--tls-ca", "/no/such/ca.pem", "health"], "embtrain: --tls-ca: /no/such/ca.pem: no such file"),
    ]
    for argv, start in cases:
        code, out, err = _run(capsys, "--target", t, *argv)
        assert (code, out) == (2, ""), (argv, err)
        assert err.startswith(start), (argv, err)
    with pytest.raises(SystemExit) as exc:  # argparse's own usage errors: status 2 as well
        cli.main(["sessions", "show"])
    assert exc.value.code == 2
    assert "usage: embtrain sessions show" in capsys.readouterr().err


def test_invalid_argument_from_the_server_exits_2_with_the_fields(module_server: ServerHandle, batch, capsys) -> None:  # type: ignore[no-untyped-def]
    p = batch["paths"]
    code, out, err = _run(capsys, "--target", module_server.target, "compute", "--loss", "batch_hard_triplet",
                          "--params", '{"margin": -1}', "--embeddings", p["X"], "--labels", p["y"])
    assert (code, out) == (2, "")
    assert err.splitlines()[0] == "embtrain: INVALID_ARGUMENT: params.margin: expected a number >= 0, got -1.0"


def test_violations_that_add_to_the_message_are_printed(capsys) -> None:  # type: ignore[no-untyped-def]
    err = embtrain.InvalidArgument(cli.grpc.StatusCode.INVALID_ARGUMENT, "2 bad fields",
                                   (embtrain.FieldViolation("a", "a: too big"), embtrain.FieldViolation("b", "odd")))
    cli._print_error(err)
    assert capsys.readouterr().err.splitlines() == [
        "embtrain: INVALID_ARGUMENT: 2 bad fields", "embtrain:   a: too big", "embtrain:   b: odd"]


def test_unreachable_server_exits_4(capsys) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = _run(capsys, "--target", f"127.0.0.1:{port}", "--timeout", "5", "sessions")
    assert (code, out) == (cli.EXIT_UNAVAILABLE, "") and code == 4
    assert err.startswith("embtrain: UNAVAILABLE: ")


def test_health_and_losses_json(server: ServerHandle, capsys) -> None:  # type: ignore[no-untyped-def]
    assert _json(capsys, "--json", "--target", server.target, "health") == {"service": "", "status": "SERVING"}
    doc = _json(capsys, "--json", "--target", server.target, "losses", "batch_hard_triplet")
    assert [d["name"] for d in doc] == ["batch_hard_triplet"]
    assert doc == _json(capsys, "--target", server.target, "losses", "--json", "batch_hard_triplet")


def test_json_output_has_no_bare_nan() -> None:
    assert cli._jsonable({"a": float("nan"), "b": [float("inf"), -float("inf")], "c": np.float32(1.5)}) == \
        {"a": "NaN", "b": ["Infinity", "-Infinity"], "c": 1.5}


def test_help_documents_the_exit_statuses(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for line in ("2    usage", "3    not found", "4    unavailable", "130  interrupted"):
        assert line in out
    for command in ("health", "losses", "sessions", "compute"):
        assert command in out


def test_ctrl_c_exits_130_quietly() -> None:
    # A "server" that accepts the connection and never answers: the command is inside its RPC when SIGINT comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(120)
        port = listener.getsockname()[1]
        proc = subprocess.Popen([*CLI, "--target", f"127.0.0.1:{port}", "--timeout", "120", "sessions"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = listener.accept()
            with conn:
                time.sleep(0.3)
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == cli.EXIT_INTERRUPTED == 130, err
    assert out == "" and err == ""
