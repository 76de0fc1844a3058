"""``embtrain``: the command-line client. ``embtrain health``, ``embtrain losses``, ``embtrain sessions``.

Output piped into a reader that stops early (``embtrain losses | head``) ends the command quietly with the status
of a process killed by SIGPIPE, as other Unix tools do, instead of a ``BrokenPipeError`` traceback."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from ._client import Client
from .errors import EmbtrainError


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, token=args.token, timeout=args.timeout,
                  root_certificates=args.tls_ca, tls=bool(args.tls_ca) or args.tls)


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
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + int(getattr(signal, "SIGPIPE", 13))


def _main(argv: Sequence[str] | None) -> int:
    # The connection options are accepted before or after the subcommand (`embtrain health --target ...`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=argparse.SUPPRESS,
                        help="server address: host:port, unix:///path or any gRPC target (env EMBTRAIN_TARGET; "
                        "default 127.0.0.1:50051)")
    common.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (default: env EMBTRAIN_TOKEN)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per call (default 10)")
    common.add_argument("--tls", action="store_true", default=argparse.SUPPRESS, help="connect with TLS")
    common.add_argument("--tls-ca", default=argparse.SUPPRESS, help="PEM file of the CA of the server's certificate")
    p = argparse.ArgumentParser(prog="embtrain", description="embtrain client", parents=[common])
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("health", parents=[common], help="check the server's health service; exit 0 when SERVING")
    h.add_argument("--service", default="", help="service name (default: the whole server)")
    ls = sub.add_parser("losses", parents=[common], help="list the losses with their inputs and parameters")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("name", nargs="?", help="show one loss")
    sub.add_parser("sessions", parents=[common], help="list your sessions")
    args = p.parse_args(argv)
    defaults = {"target": os.environ.get("EMBTRAIN_TARGET", "127.0.0.1:50051"), "token": None, "timeout": 10.0,
                "tls": False, "tls_ca": None}
    for key, value in defaults.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    try:
        with _client(args) as client:
            if args.command == "health":
                status = client.health(args.service)
                print(status)
                return 0 if status == "SERVING" else 1
            if args.command == "losses":
                infos = [i for i in client.losses() if args.name in (None, i.name)]
                if args.name and not infos:
                    print(f"embtrain: no loss named {args.name!r}", file=sys.stderr)
                    return 1
                if args.json:
                    print(json.dumps([vars(i) for i in infos], indent=2))
                else:
                    for info in infos:
                        _print_loss(info, verbose=bool(args.name))
                return 0
            for s in client.list_sessions():
                print(f"{s.session_id}  {s.loss:<28} step {s.step:<8} {s.status}")
            return 0
    except EmbtrainError as err:
        print(f"embtrain: {err}", file=sys.stderr)
        return 1


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


if __name__ == "__main__":
    sys.exit(main())
