"""``embtrain-server``: parse the configuration, set up logging and run the server until SIGTERM/SIGINT."""

from __future__ import annotations

import os

# torch's C++ layer logs every refused store connection (replica 0 restarting) with a stack trace; the replicas
# log what matters, and what fails reaches Python as an exception. Set TORCH_CPP_LOG_LEVEL to see it anyway.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
# OpenMP threads that spin-wait after each parallel region (libgomp's default: milliseconds) hold cores that the event
# loop, gRPC and often the clients on the same host need to answer the batch just computed; on a host with more
# runnable threads than cores a spinning team can lose a scheduler quantum at every barrier (a 2-core host measured
# compute 3-70x slower). Sleeping at once made the server's compute no slower there and its round trips and
# streams cheaper (bench/README.md, Transport). Set OMP_WAIT_POLICY or GOMP_SPINCOUNT to choose otherwise; the
# OpenMP runtime reads them as torch loads.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import asyncio  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from . import config as config_mod  # noqa: E402
from .server import serve  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg, args = config_mod.load(argv)
    except (ValueError, OSError) as exc:
        print(f"embtrain-server: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(config_mod.dump_yaml(cfg))
        return 0
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(cfg, args.config_path))
    except (ValueError, OSError) as exc:
        logging.getLogger("embtrain.server").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
