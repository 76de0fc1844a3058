"""``embtrain``: the command-line client. ``embtrain health``, ``embtrain losses``, ``embtrain sessions``
(``list``, ``show``, ``close``, ``export``, ``checkpoint``) and ``embtrain compute``.

``--json`` (before or after the subcommand) makes every command print one JSON document on stdout. Failures print
``embtrain: CODE: message`` (and the request fields at fault) on stderr and exit with the status of their class:
see ``EXIT_STATUS_HELP``. Output piped into a reader that stops early (``embtrain losses | head``) ends the command
quietly with the status of a process killed by SIGPIPE, and Ctrl-C with the status of one killed by SIGINT, as other
Unix tools do, instead of a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from ._client import Client, ComputeResult, Session, SessionInfo
from .errors import EmbtrainError

EXIT_OK = 0
EXIT_FAILURE = 1  # any other failure; also `health` answered with a status other than SERVING
EXIT_USAGE = 2  # a bad command line, an unreadable input file, INVALID_ARGUMENT (argparse's own status for usage)
EXIT_NOT_FOUND = 3  # NOT_FOUND: no such session, no such loss
EXIT_UNAVAILABLE = 4  # UNAVAILABLE / DEADLINE_EXCEEDED: the server cannot be reached or did not answer in time
EXIT_INTERRUPTED = 128 + int(signal.SIGINT)  # 130: Ctrl-C
EXIT_BROKEN_PIPE = 128 + int(getattr(signal, "SIGPIPE", 13))  # 141: the reader of stdout went away

_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
}

EXIT_STATUS_HELP = """\
exit status:
  0    success
  1    any other failure (the server refused or failed the call); `health`: not SERVING
  2    usage: a bad command line or input file, or the server's INVALID_ARGUMENT
  3    not found: no such session or loss (NOT_FOUND)
  4    unavailable: the server cannot be reached or did not answer within --timeout
       (UNAVAILABLE, DEADLINE_EXCEEDED)
  130  interrupted (Ctrl-C)
  141  stdout closed early by its reader (`embtrain losses | head`)

Errors print `embtrain: CODE: message` and the request fields at fault on stderr.
--json: one JSON document on stdout (non-finite numbers as the strings "NaN", "Infinity", "-Infinity")."""


class UsageError(Exception):
    """A bad command line or input file, found before anything is sent: ``embtrain: message``, exit 2."""

    status = EXIT_USAGE


class OutputError(UsageError):
    """A result that could not be written (``--out``): ``embtrain: message``, exit 1."""

    status = EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        # Output to a pipe is block-buffered: flush here, where a closed pipe can be handled, rather than in the
        # interpreter's final flush, which would report it as an error.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away. Point stdout at devnull so that the interpreter's final flush of what is still
        # buffered does not raise again, and exit as a SIGPIPE-killed process would (128 + 13 = 141).
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        # Ctrl-C: no traceback; the status of a process killed by SIGINT, as the shell reports it (128 + 2).
        try:
            sys.stdout.flush()
        except (BrokenPipeError, OSError):  # pragma: no cover - a reader gone as well
            _stdout_to_devnull()
        return EXIT_INTERRUPTED


def _stdout_to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _parser() -> argparse.ArgumentParser:
    # The connection options and --json are accepted before or after the subcommand (`embtrain health --target
    # ...`): every parser takes them, with SUPPRESS defaults so that a later parser does not undo an earlier one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=argparse.SUPPRESS,
                        help="server address: host:port, unix:///path or any gRPC target (env EMBTRAIN_TARGET; "
                        "default 127.0.0.1:50051)")
    common.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (default: env EMBTRAIN_TOKEN)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per call (default 10)")
    common.add_argument("--tls", action="store_true", default=argparse.SUPPRESS, help="connect with TLS")
    common.add_argument("--tls-ca", default=argparse.SUPPRESS, help="PEM file of the CA of the server's certificate")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document (machine-readable)")
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="embtrain", description="embtrain client", parents=[common],
                                epilog=EXIT_STATUS_HELP, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    h = sub.add_parser("health", parents=[common], help="check the server's health service; exit 0 when SERVING",
                       epilog=EXIT_STATUS_HELP, formatter_class=fmt)
    h.add_argument("--service", default="", help="service name (default: the whole server)")

    ls = sub.add_parser("losses", parents=[common], help="list the losses with their inputs and parameters",
                        epilog=EXIT_STATUS_HELP, formatter_class=fmt)
    ls.add_argument("name", nargs="?", help="show one loss")

    ss = sub.add_parser("sessions", parents=[common], help="list, show, close, export or checkpoint your sessions",
                        description="Your sessions. Without an action: list them.",
                        epilog=EXIT_STATUS_HELP, formatter_class=fmt)
    sa = ss.add_subparsers(dest="action", metavar="ACTION")
    sa.add_parser("list", parents=[common], help="list your sessions (the default)")
    show = sa.add_parser("show", parents=[common], help="one session's configuration and state")
    show.add_argument("session_id", metavar="ID")
    close = sa.add_parser("close", parents=[common], help="close a session")
    close.add_argument("session_id", metavar="ID")
    close.add_argument("--keep-checkpoint", action="store_true",
                       help="write a final checkpoint and keep it in the server's state_dir")
    export = sa.add_parser(
        "export", parents=[common], help="write a session's head and loss state into a directory",
        description="Writes DIR/config.json (the head's configuration: head, in_dim, out_dim, loss, step), "
        "DIR/weights.safetensors (the head's parameters) and DIR/state.NAME.npy for each loss state tensor "
        "(e.g. island's centres); prints the paths written. embtrain.ExportedModel(config, weights, state, step) "
        "built from them is what Session.export_model() returns (see embtrain.torch.load_head).")
    export.add_argument("session_id", metavar="ID")
    export.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if missing)")
    ckpt = sa.add_parser("checkpoint", parents=[common], help="write a checkpoint now; prints its step")
    ckpt.add_argument("session_id", metavar="ID")

    c = sub.add_parser(
        "compute", parents=[common], help="compute one batch: loss, stats, triplets; gradients with --out",
        description="Computes one batch, stateless (--loss, --params) or in a session (--session: the batch "
        "trains it), and prints the loss, triplets_total and the stats. With --out DIR it writes DIR/grad.INPUT.npy "
        "for each gradient (grad.embeddings.npy: d loss / d embeddings), DIR/triplets.npy, DIR/triplet_ids.npy and "
        "DIR/per_item_losses.npy where the loss returns them.",
        epilog=EXIT_STATUS_HELP, formatter_class=fmt)
    c.add_argument("--loss", metavar="NAME", help="loss name (see `embtrain losses`); not with --session")
    c.add_argument("--params", metavar="JSON", help="loss parameters as a JSON object, or @FILE holding one")
    c.add_argument("--embeddings", metavar="X.npy", help="embeddings [n, d] (.npy)")
    c.add_argument("--labels", metavar="y.npy", help="labels [n] (.npy)")
    c.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="another named input (repeatable), e.g. --input ids=ids.npy or a torch loss's "
                   "--input input=a.npy --input target=b.npy")
    c.add_argument("--session", metavar="ID", help="compute in this session (trains its head, advances its step)")
    c.add_argument("--out", metavar="DIR", help="write the gradients, triplets and per-item losses as .npy here")
    return p


def _main(argv: Sequence[str] | None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    defaults = {"target": os.environ.get("EMBTRAIN_TARGET", "127.0.0.1:50051"), "token": None, "timeout": 10.0,
                "tls": False, "tls_ca": None, "json": False}
    for key, value in defaults.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    try:
        # The input files and the command line are checked before a connection is made.
        compute_args = _compute_inputs(args) if args.command == "compute" else None
        if args.tls_ca is not None and not os.path.isfile(args.tls_ca):
            raise UsageError(f"--tls-ca: {args.tls_ca}: no such file")
        with _client(args) as client:
            if args.command == "health":
                return _health(client, args)
            if args.command == "losses":
                return _losses(client, args)
            if args.command == "compute":
                assert compute_args is not None
                return _compute(client, args, compute_args)
            return _sessions(client, args)
    except UsageError as err:
        print(f"embtrain: {err}", file=sys.stderr)
        return err.status
    except EmbtrainError as err:
        _print_error(err)
        return _EXIT_BY_CODE.get(err.code, EXIT_FAILURE)


def _client(args: argparse.Namespace) -> Client:
    try:
        return Client(args.target, token=args.token, timeout=args.timeout,
                      root_certificates=args.tls_ca, tls=bool(args.tls_ca) or args.tls)
    except OSError as exc:  # the CA file vanished or cannot be read
        raise UsageError(f"--tls-ca: {args.tls_ca}: {exc.strerror or exc}") from None


def _print_error(err: EmbtrainError) -> None:
    print(f"embtrain: {err.code.name}: {err.message}", file=sys.stderr)
    for v in err.violations:
        text = v.description if v.description.startswith(f"{v.field}:") else f"{v.field}: {v.description}"
        if text != err.message:
            print(f"embtrain:   {text}", file=sys.stderr)


# ---- output ------------------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    """Plain JSON values: non-finite floats as "NaN" / "Infinity" / "-Infinity", numpy scalars and arrays as
    Python numbers and lists."""
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def _print_json(doc: Any) -> None:
    print(json.dumps(_jsonable(doc), indent=2, allow_nan=False))


def _info_dict(info: SessionInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def _print_info(info: SessionInfo) -> None:
    d = _info_dict(info)
    width = max(len(k) for k in d)
    for key, value in d.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(_jsonable(value), sort_keys=True)
        elif value == "":
            value = "-"
        print(f"{key:<{width}}  {value}")


# ---- commands ----------------------------------------------------------------------------------------------
def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    if args.json:
        _print_json({"service": args.service, "status": status})
    else:
        print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILURE


def _losses(client: Client, args: argparse.Namespace) -> int:
    infos = [i for i in client.losses() if args.name in (None, i.name)]
    if args.name and not infos:
        print(f"embtrain: NOT_FOUND: no loss named {args.name!r} (see `embtrain losses`)", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        _print_json([vars(i) for i in infos])
    else:
        for info in infos:
            _print_loss(info, verbose=bool(args.name))
    return EXIT_OK


def _print_loss(info, verbose: bool) -> None:  # type: ignore[no-untyped-def]
    flags = ", ".join(f for f, on in (("mines triplets", info.mines_triplets), ("stateful", info.stateful)) if on)
    print(f"{info.name}  [{info.family}{', ' + flags if flags else ''}]")
    print(f"    {info.description.splitlines()[0] if info.description else ''}")
    ins = ", ".join(f"{i['name']}{'' if i['required'] else '?'} {i['dtype']}{i['shape']}" for i in info.inputs)
    print(f"    inputs: {ins}")
    for prm in info.params:
        extra = f" in {prm['range']}" if prm["range"] else ""
        print(f"    {prm['name']}: {prm['type']} = {prm['default']!r}{extra}"
              + (f"  -- {prm['description']}" if verbose and prm["description"] else ""))


def _sessions(client: Client, args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action == "list":
        infos = client.list_sessions()
        if args.json:
            _print_json([_info_dict(s) for s in infos])
        else:
            for s in infos:
                print(f"{s.session_id}  {s.loss:<28} step {s.step:<8} {s.status}")
        return EXIT_OK
    session = Session(client, args.session_id)  # an unknown id: NotFound from the first call
    if action == "show":
        info = session.info()
        if args.json:
            _print_json(_info_dict(info))
        else:
            _print_info(info)
    elif action == "close":
        info = session.close(keep_checkpoint=args.keep_checkpoint)
        if args.json:
            _print_json(_info_dict(info))
        else:
            kept = f", checkpoint kept at step {info.last_checkpoint_step}" if args.keep_checkpoint else ""
            print(f"closed {info.session_id} at step {info.step}{kept}")
    elif action == "checkpoint":
        step = session.save_checkpoint()
        if args.json:
            _print_json({"session_id": session.id, "step": step})
        else:
            print(step)
    else:  # export
        model = session.export_model()  # before the directory is made: an unknown id leaves nothing behind
        out = _out_dir(args.out)
        files = [_write_bytes(out / "config.json", (json.dumps(model.config, indent=2) + "\n").encode()),
                 _write_bytes(out / "weights.safetensors", model.weights)]
        files += [_save_npy(out, f"state.{name}", value) for name, value in sorted(model.state.items())]
        if args.json:
            _print_json({"session_id": session.id, "step": model.step, "files": files})
        else:
            print(f"exported {session.id} at step {model.step}:")
            for f in files:
                print(f"  {f}")
    return EXIT_OK


@dataclasses.dataclass
class _ComputeArgs:
    embeddings: Any
    labels: Any
    inputs: dict[str, Any]
    params: dict[str, Any] | None


def _compute_inputs(args: argparse.Namespace) -> _ComputeArgs:
    if args.session is not None:
        for opt, value in (("--loss", args.loss), ("--params", args.params)):
            if value is not None:
                raise UsageError(f"{opt}: a session has its own loss and parameters; leave {opt} out with --session")
    elif not args.loss:
        raise UsageError("--loss: required (a loss name, see `embtrain losses`), or --session ID")
    params = _params(args.params) if args.params is not None else None
    inputs: dict[str, Any] = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise UsageError(f"--input: expected NAME=FILE.npy, got {item!r}")
        if name in inputs or (name == "embeddings" and args.embeddings) or (name == "labels" and args.labels):
            raise UsageError(f"--input: input {name!r} given twice")
        inputs[name] = _load_npy(f"--input {name}", path)
    embeddings = _load_npy("--embeddings", args.embeddings) if args.embeddings else inputs.pop("embeddings", None)
    labels = _load_npy("--labels", args.labels) if args.labels else inputs.pop("labels", None)
    if embeddings is None and not inputs:
        raise UsageError("--embeddings: required (X.npy), or the loss's inputs as --input NAME=FILE.npy")
    return _ComputeArgs(embeddings, labels, inputs, params)


def _params(text: str) -> dict[str, Any]:
    source = "--params"
    if text.startswith("@"):
        source = f"--params {text}"
        try:
            text = pathlib.Path(text[1:]).read_text()
        except OSError as exc:
            raise UsageError(f"--params: cannot read {text[1:]}: {exc.strerror or exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{source}: expected a JSON object such as '{{\"margin\": 0.2}}', got "
                         f"{type(value).__name__}")
    return value


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _load_npy(option: str, path: str) -> np.ndarray:
    """One array from a .npy file (never pickled objects); a failure names the option and the file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
            if magic != _NPY_MAGIC:
                what = "an .npz archive" if magic.startswith(_ZIP_MAGIC) else "not a .npy file"
                raise UsageError(f"{option}: {path}: {what}; expected one array saved with numpy.save")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"{option}: {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{option}: {path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UsageError(f"{option}: {path}: holds Python objects (dtype object), which are never loaded; "
                             "expected a numeric array") from None
        raise UsageError(f"{option}: {path}: not a valid .npy array ({exc})") from None
    except EOFError:
        raise UsageError(f"{option}: {path}: truncated .npy file") from None


def _compute(client: Client, args: argparse.Namespace, a: _ComputeArgs) -> int:
    out = _out_dir(args.out) if args.out else None  # before the call: a session batch must not be lost
    r: ComputeResult = client.compute(a.embeddings, a.labels, loss=args.loss, params=a.params,
                                      session_id=args.session, per_item_losses=out is not None, **a.inputs)
    files: list[str] = []
    if out is not None:
        files += [_save_npy(out, f"grad.{name}", g) for name, g in sorted(r.gradients.items()) if g is not None]
        for name in ("triplets", "triplet_ids", "per_item_losses"):
            value = getattr(r, name)
            if value is not None:
                files.append(_save_npy(out, name, value))
    doc: dict[str, Any] = {"loss": r.loss, "triplets_total": r.triplets_total}
    if r.triplets_truncated:
        doc["triplets_truncated"] = True
    if args.session is not None:
        doc["session_id"], doc["step"] = args.session, r.step
    doc["stats"] = dict(r.stats)
    if out is not None:
        doc["files"] = files
    if args.json:
        _print_json(doc)
        return EXIT_OK
    print(f"loss            {r.loss!r}")
    print(f"triplets_total  {r.triplets_total}{' (truncated)' if r.triplets_truncated else ''}")
    if args.session is not None:
        print(f"step            {r.step}")
    if r.stats:
        width = max(len(k) for k in r.stats)
        print("stats:")
        for key, value in sorted(r.stats.items()):
            print(f"  {key:<{width}}  {value!r}")
    if files:
        print("wrote:")
        for f in files:
            print(f"  {f}")
    return EXIT_OK


# ---- files -------------------------------------------------------------------------------------------------
def _out_dir(path: str) -> pathlib.Path:
    out = pathlib.Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {path}: {exc.strerror or exc}") from None
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _save_npy(out: pathlib.Path, stem: str, value: Any) -> str:
    path = out / f"{_safe(stem)}.npy"
    try:
        np.save(path, np.asarray(value), allow_pickle=False)
    except OSError as exc:
        raise OutputError(f"--out: cannot write {path}: {exc.strerror or exc}") from None
    return str(path)


def _write_bytes(path: pathlib.Path, data: bytes) -> str:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise OutputError(f"--out: cannot write {path}: {exc.strerror or exc}") from None
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
