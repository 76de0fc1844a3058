"""``make demo``: train a small digits encoder with embtrain's ``RemoteLoss`` and, on the same batches, with the
same loss computed in this process; print Recall@1 / MAP@R / timings side by side and draw the loss curves and a
PCA of the test embeddings.

By default it starts an embtrain server (``python -m embtrain_server.main`` on a free port, no persistence),
waits until its health check says SERVING, and stops it with SIGTERM at the end; ``--target host:port`` uses a
running server instead. Outputs go to ``examples/digits/out/`` (results.json, results.md, digits.png, server.log);
the table and the figure are also copied next to this file for the README.

    python examples/digits/run_demo.py [--epochs 12] [--losses batch_hard_triplet,multi_similarity]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # makes ``digits`` importable when run as a script

import torch  # noqa: E402

import embtrain  # noqa: E402
from digits.train import (  # noqa: E402
    DEFAULT_CONFIGS,
    InProcessLoss,
    LossConfig,
    Split,
    evaluate,
    embed,
    initial_encoder,
    island_centers,
    load_split,
    pk_batches,
    train_side_by_side,
)
from embtrain.torch import RemoteLoss  # noqa: E402
from embtrain_server import process  # noqa: E402


# ---- server lifecycle ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(device: str, log_path: pathlib.Path, threads: int = 0) -> Iterator[str]:
    """``embtrain-server`` in a subprocess on a free loopback port; yields its target; SIGTERM at the end.
    ``threads`` > 0 sets its torch CPU threads."""
    args = ["--metrics-port", "0", "--no-persist", "--device", device, "--drain-seconds", "5"]
    if threads > 0:
        args += ["--torch-threads", str(threads)]
    with process.running(args, log_path=log_path, startup_seconds=90.0) as (target, _):
        yield target


# ---- one configuration ---------------------------------------------------------------------------------------


def run_config(client: embtrain.Client, cfg: LossConfig, split: Split, *, steps: int, classes_per_batch: int,
               samples_per_class: int, dim: int, seed: int, lr: float, progress: bool) -> dict[str, Any]:
    """Train the remote and the local run of one loss and evaluate both (and the untrained encoder)."""
    encoder = initial_encoder(cfg.normalize, dim, seed)
    batches = pk_batches(split.y_train, classes_per_batch, samples_per_class, steps, seed + 1)
    num_classes = int(split.y_train.max()) + 1
    initial = {"initial_centers": island_centers(num_classes, dim, seed + 2)} if cfg.session else {}
    session = None
    if cfg.session:
        session = client.create_session(cfg.loss, dict(cfg.params), seed=seed, initial_state=initial)
        remote_fn = RemoteLoss(session)
    else:
        remote_fn = RemoteLoss(client, cfg.loss, dict(cfg.params))
    local_fn = InProcessLoss(cfg.loss, cfg.params, initial_state=initial)
    try:
        runs = train_side_by_side(encoder, split, batches, {"remote": remote_fn, "local": local_fn}, lr=lr,
                                  progress=cfg.label if progress else None)
    finally:
        if session is not None:
            session.close()
    remote, local = runs["remote"], runs["local"]
    diffs = [abs(a - b) / max(1.0, abs(b)) for a, b in zip(remote.losses, local.losses)]
    test_x = split.x_test
    return {
        "loss": cfg.loss, "label": cfg.label, "params": dict(cfg.params), "session": cfg.session,
        "normalize": cfg.normalize, "steps": steps,
        "untrained": evaluate(encoder, split),
        "remote": {"metrics": evaluate(remote.encoder, split), "wall_seconds": remote.wall_seconds,
                   "loss_seconds": remote.loss_seconds, "losses": remote.losses},
        "local": {"metrics": evaluate(local.encoder, split), "wall_seconds": local.wall_seconds,
                  "loss_seconds": local.loss_seconds, "losses": local.losses},
        "max_rel_loss_diff": max(diffs) if diffs else 0.0,
        "first_step_rel_loss_diff": diffs[0] if diffs else 0.0,
        "_embeddings": embed(remote.encoder, test_x),
    }


# ---- report --------------------------------------------------------------------------------------------------


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    head = ("| loss | run | Recall@1 | MAP@R | wall s | in loss calls s | ms / step in loss |\n"
            "|---|---|---:|---:|---:|---:|---:|")
    rows = [head]
    for r in results:
        u = r["untrained"]
        rows.append(f"| {r['label']} | untrained | {100 * u['recall_at_1']:.1f} | {100 * u['map_at_r']:.1f} "
                    "| | | |")
        for side in ("remote", "local"):
            s = r[side]
            m = s["metrics"]
            rows.append(f"| {r['label']} | {side} | {100 * m['recall_at_1']:.1f} | {100 * m['map_at_r']:.1f} | "
                        f"{s['wall_seconds']:.2f} | {s['loss_seconds']:.2f} | "
                        f"{1000 * s['loss_seconds'] / max(1, r['steps']):.2f} |")
    lines = ["\n".join(rows), "",
             "Recall@1 and MAP@R in %, on the test split (leave-one-out, cosine). Remote vs local per-step loss, "
             "largest relative difference: " + ", ".join(f"{r['label']} {r['max_rel_loss_diff']:.1e}" for r in results)
             + "."]
    return "\n".join(lines)


def bare_round_trip_ms(client: embtrain.Client, calls: int = 300) -> float:
    """Median of a gRPC call that does nothing (the health check) over this client's channel: the floor under any
    remote step on this machine."""
    client.health()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        client.health()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def step_time_table(results: Sequence[dict[str, Any]], round_trip_ms: float) -> str:
    """Remote and local step times side by side, and where the difference goes."""
    rows = ["| loss | local ms / step | remote ms / step | remote - local | bare gRPC round trip | the rest |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        local, remote = (1000 * r[side]["loss_seconds"] / max(1, r["steps"]) for side in ("local", "remote"))
        rows.append(f"| {r['label']} | {local:.2f} | {remote:.2f} | {remote - local:.2f} | {round_trip_ms:.2f} | "
                    f"{remote - local - round_trip_ms:.2f} |")
    return "\n".join(rows) + (
        "\n\nA remote step computes the same loss as the local one (on the server, same machine here) and adds one "
        "gRPC round trip: the bare round trip is the median of an empty call (the health check) on the same channel. "
        "The rest is the service's own work per step: encoding the batch and decoding the answer in the SDK, "
        "parsing, validating and scheduling the batch on the server, and encoding its answer. With 64-row batches "
        "the loss itself takes about a millisecond, so this fixed cost dominates; it stays the same as batches grow, "
        "while the loss's cost grows as n² (bench/README.md, Transport). The stateless losses are computed on the "
        "server's event loop (small batches at idle workers: no hand-over between threads); the island session's "
        "batches take the session's ordered path through a worker thread, which adds two thread hops (and the "
        "session's bookkeeping) to its rest.")


def plot(results: Sequence[dict[str, Any]], labels: torch.Tensor, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(results)
    fig, axes = plt.subplots(2, cols, figsize=(4.0 * cols, 7.6), squeeze=False, layout="constrained")
    for j, r in enumerate(results):
        ax = axes[0][j]
        ax.plot(r["remote"]["losses"], label="remote (embtrain)", lw=1.6)
        ax.plot(r["local"]["losses"], label="local (in-process)", lw=1.0, ls="--")
        ax.set_title(r["label"], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
        # PCA of the L2-normalised embeddings: the space the metrics rank in (cosine).
        z = torch.nn.functional.normalize(r["_embeddings"].to(torch.float64), dim=1)
        z = z - z.mean(0)
        # PCA: the top two right singular vectors of the centred test embeddings.
        _, _, v = torch.linalg.svd(z, full_matrices=False)
        xy = (z @ v[:2].T).numpy()
        ax = axes[1][j]
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
        rm = r["remote"]["metrics"]
        ax.set_title(f"test embeddings, PCA (remote)\nRecall@1 {100 * rm['recall_at_1']:.1f}%", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes[1].tolist(), ticks=range(10), label="digit", shrink=0.9)
    fig.suptitle("embtrain digits demo: remote vs in-process loss", fontsize=12)
    fig.savefig(path, dpi=72, bbox_inches="tight")
    plt.close(fig)


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


# ---- main ----------------------------------------------------------------------------------------------------


def parse_configs(names: str | None) -> list[LossConfig]:
    if not names:
        return list(DEFAULT_CONFIGS)
    known = {c.loss: c for c in DEFAULT_CONFIGS}
    out = []
    for name in names.split(","):
        name = name.strip()
        out.append(known.get(name) or LossConfig(name))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", help="use a running server (host:port) instead of starting one")
    p.add_argument("--device", default="cpu", help="device of the started server (cpu, cuda, auto; default cpu)")
    p.add_argument("--losses", help="comma-separated loss names (default: "
                   + ", ".join(c.loss for c in DEFAULT_CONFIGS) + ")")
    p.add_argument("--epochs", type=float, default=15.0, help="passes over the training split (default 15)")
    p.add_argument("--classes-per-batch", type=int, default=8, help="P (default 8)")
    p.add_argument("--samples-per-class", type=int, default=8, help="K (default 8)")
    p.add_argument("--dim", type=int, default=16, help="embedding width (default 16)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads here and in the started server (default 1: the batches are tiny, and "
                   "thread pools only stall on a busy 2-core machine; 0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "out"), help="output folder (default examples/digits/out)")
    p.add_argument("--no-copy", action="store_true", help="do not copy results.md and digits.png next to this file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, out)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, out: pathlib.Path) -> int:
    split = load_split()
    batch = args.classes_per_batch * args.samples_per_class
    steps = max(1, round(args.epochs * len(split.y_train) / batch))
    configs = parse_configs(args.losses)
    print(f"digits: {len(split.y_train)} train / {len(split.y_test)} test samples, {steps} steps of "
          f"{args.classes_per_batch}x{args.samples_per_class}, losses: {', '.join(c.label for c in configs)}")

    started = time.perf_counter()
    server_cm = (contextlib.nullcontext(args.target) if args.target
                 else running_server(args.device, out / "server.log", args.threads))
    results = []
    with server_cm as target, embtrain.Client(target, timeout=60.0) as client:
        round_trip = bare_round_trip_ms(client)
        available = {li.name for li in client.losses()}
        for cfg in configs:
            if cfg.loss not in available:
                print(f"  skipping {cfg.loss}: not served by {target}", file=sys.stderr)
                continue
            results.append(run_config(client, cfg, split, steps=steps, classes_per_batch=args.classes_per_batch,
                                      samples_per_class=args.samples_per_class, dim=args.dim, seed=args.seed,
                                      lr=args.lr, progress=not args.no_progress))
    total = time.perf_counter() - started
    if not results:
        print("no loss could be run", file=sys.stderr)
        return 1

    table = markdown_table(results) + "\n\n" + step_time_table(results, round_trip)
    header = (f"Digits demo, {steps} steps of {batch} samples, embedding width {args.dim}; {machine()}; server "
              f"{args.target or 'started locally on ' + args.device}; torch threads "
              f"{args.threads or 'default'}; remote and local steps interleaved; total {total:.0f} s.\n\n")
    (out / "results.md").write_text(header + table + "\n")
    plot(results, split.y_test, out / "digits.png")
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    (out / "results.json").write_text(json.dumps({
        "machine": machine(), "steps": steps, "batch": batch, "dim": args.dim, "seed": args.seed,
        "total_seconds": total, "results": clean}, indent=1))
    if not args.no_copy:
        shutil.copyfile(out / "results.md", HERE / "results.md")
        shutil.copyfile(out / "digits.png", HERE / "digits.png")
    print()
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'digits.png'} ({total:.0f} s in all)")
    worst = max(abs(r["remote"]["metrics"]["recall_at_1"] - r["local"]["metrics"]["recall_at_1"]) for r in results)
    if worst > 0.01:
        print(f"WARNING: remote and local Recall@1 differ by {100 * worst:.1f} points", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
