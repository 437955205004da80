"""durable_asgi against what a Python user would pick instead — one workload, one Redis, one run.

    python bench/peers.py                  # prints the table, writes docs/img/peers.png
    python bench/peers.py --quick          # smaller numbers, for a smoke run
    python bench/peers.py --rounds 1       # one round instead of three

Variants (all `bench/load_app.py` on one uvicorn worker, the same Starlette endpoint):
``bare`` (no resumability), durable_asgi with ``memory``, ``sqlite``, ``redis`` and ``postgres``
stores, and the PyPI packages ``fastapi-resumable-stream`` (``frs``) and ``resumable-stream``
(``rs``), wired as their READMEs show, on the same Redis as durable_asgi's Redis store.

Measured (the client is a separate asyncio process on raw sockets):

- **throughput**: one stream of ``--chunks`` 64-byte chunks produced as fast as possible, read
  by the client that started it; chunks/s (median of 3).
- **resume TTFB**: ``--resumes`` streams (20 chunks/s for 2 s); 1 s into each, a second request
  with the same key joins it; time from its request to its first chunk, p50/p99.
- **fan-out**: one stream (20 chunks/s, 4 s) read by ``--fanout`` clients that joined it in its
  first 0.2 s; per-chunk latency (producer's clock to each client's read), p50/p99. The bare app
  can't share a stream: its row is that many independent streams.
- **memory**: the server's peak RSS over all of the above.

Every variant runs ``--rounds`` times (default 3), the variants taking turns, each round in a
fresh server; the table shows each figure's median over the rounds. On a 2-core machine one
round's latency percentiles move by several milliseconds with whatever else the machine is
doing (the client, Redis and the server share the cores), and turns spread that evenly.

Needs ``pip install -e '.[bench]'`` and a Redis (``--redis URL`` or a ``redis-server`` binary).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from load import (
    ROOT,
    Sampler,
    Stats,
    drop_postgres_schemas,
    percentiles,
    postgres_url,
    read_stream,
    redis_server,
    serve,
)

VARIANTS = ["bare", "memory", "sqlite", "redis", "postgres", "frs", "rs"]
LABELS = {
    "bare": "bare app",
    "memory": "durable_asgi memory",
    "sqlite": "durable_asgi SQLite",
    "redis": "durable_asgi Redis",
    "postgres": "durable_asgi PostgreSQL",
    "frs": "fastapi-resumable-stream",
    "rs": "resumable-stream",
}


# -- client (a separate process) ----------------------------------------------------------------


async def throughput(port: int, chunks: int) -> float:
    runs = []
    for _ in range(3):
        stats = Stats()
        path = f"/live?n={chunks}&rate=0&size=64"
        started = time.perf_counter()
        await read_stream(port, path, uuid.uuid4().hex, stats, resumer=False)
        elapsed = time.perf_counter() - started
        if stats.chunks != chunks:
            raise RuntimeError(f"throughput: got {stats.chunks} of {chunks} chunks")
        runs.append(chunks / elapsed)
    return statistics.median(runs)


async def resume_ttfb(port: int, streams: int, shared: bool) -> dict[str, Any]:
    stats = Stats()
    path = "/live?n=40&rate=20&size=64"

    async def one(i: int) -> None:
        await asyncio.sleep(i / streams)  # start them over 1 s
        key = uuid.uuid4().hex
        first = asyncio.create_task(read_stream(port, path, key, stats, resumer=False))
        await asyncio.sleep(1.0)
        await read_stream(port, path, key, stats, resumer=True, joined=time.time())
        await first

    await asyncio.gather(*(one(i) for i in range(streams)))
    return {"ttfb": percentiles(stats.ttfb) if shared else None, "errors": stats.errors}


async def fanout(port: int, readers: int, shared: bool) -> dict[str, Any]:
    stats = Stats()
    path = "/live?n=80&rate=20&size=64"
    key = uuid.uuid4().hex
    tasks = [asyncio.create_task(read_stream(port, path, key, stats, resumer=False))]
    await asyncio.sleep(0.05)
    for _ in range(readers - 1):
        # The bare app can't share: each reader gets a stream of its own.
        this_key = key if shared else uuid.uuid4().hex
        joined = time.time()
        tasks.append(
            asyncio.create_task(
                read_stream(port, path, this_key, stats, resumer=shared, joined=joined)
            )
        )
        await asyncio.sleep(0.15 / readers)
    await asyncio.gather(*tasks)
    latencies = stats.latencies + stats.resumer_latencies
    received = stats.chunks + stats.resumer_chunks
    return {
        "latency": percentiles(latencies),
        "delivered": received / (80 * readers),
        "errors": stats.errors,
    }


async def client(args: argparse.Namespace) -> dict[str, Any]:
    shared = args.variant != "bare"
    result: dict[str, Any] = {"throughput": await throughput(args.port, args.chunks)}
    result["resume"] = await resume_ttfb(args.port, args.resumes, shared)
    result["fanout"] = await fanout(args.port, args.fanout, shared)
    return result


# -- orchestration ---------------------------------------------------------------------------


def run_variant(
    variant: str, args: argparse.Namespace, redis: str | None, tmp: Path
) -> dict[str, Any]:
    with serve(variant, redis, tmp) as (port, pid):
        command = [
            sys.executable, __file__, "--client", "--variant", variant, "--port", str(port),
            "--chunks", str(args.chunks), "--resumes", str(args.resumes),
            "--fanout", str(args.fanout),
        ]  # fmt: skip
        warm = [*command[:7], "--chunks", "200", "--resumes", "2", "--fanout", "2"]
        subprocess.run(warm, check=True, capture_output=True, timeout=120)
        with Sampler(pid) as sampler:
            out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout)
    result.update(variant=variant, rss=sampler.peak / 2**20)
    return result


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds of a variant: the median of each figure."""

    def med(get: Any) -> Any:
        values = [get(r) for r in rounds]
        return None if any(v is None for v in values) else statistics.median(values)

    def pcts(get: Any) -> dict[str, float] | None:
        if any(get(r) is None for r in rounds):
            return None
        return {q: statistics.median(get(r)[q] for r in rounds) for q in ("p50", "p99")}

    return {
        "variant": rounds[0]["variant"],
        "rounds": len(rounds),
        "throughput": med(lambda r: r["throughput"]),
        "resume": {"ttfb": pcts(lambda r: r["resume"]["ttfb"])},
        "fanout": {
            "latency": pcts(lambda r: r["fanout"]["latency"]),
            "delivered": med(lambda r: r["fanout"]["delivered"]),
        },
        "rss": med(lambda r: r["rss"]),
        "each": rounds,
    }


def pct(p: dict[str, float] | None) -> str:
    return "n/a" if p is None else f"{p['p50']:.1f} / {p['p99']:.1f}"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"throughput: 1 stream x {args.chunks} x 64 B as fast as possible; resume: "
        f"{args.resumes} streams joined at 1 s; fan-out: 1 stream (20 chunks/s) x "
        f"{args.fanout} readers; one uvicorn worker each; median of {args.rounds} round(s)\n",
        "| variant | throughput (chunks/s) | resume TTFB p50 / p99 (ms) "
        "| fan-out latency p50 / p99 (ms) | fan-out delivered | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS[r['variant']]} | {r['throughput']:,.0f} | {pct(r['resume']['ttfb'])} "
            f"| {pct(r['fanout']['latency'])} | {r['fanout']['delivered']:.1%} "
            f"| {r['rss']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        LABELS[r["variant"]].replace("durable_asgi ", "durable_asgi\n").replace("e-", "e-\n")
        for r in rows
    ]
    colors = ["#999999" if r["variant"] == "bare" else
              "#2b6cb0" if r["variant"] in ("memory", "sqlite", "redis", "postgres") else "#c05621"
              for r in rows]  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        (axes[0][0], [r["throughput"] for r in rows], "throughput (chunks/s, higher is better)"),
        (axes[0][1], [(r["resume"]["ttfb"] or {}).get("p99", 0) for r in rows],
         "resume TTFB p99 (ms, lower is better)"),
        (axes[1][0], [(r["fanout"]["latency"] or {}).get("p99", 0) for r in rows],
         "fan-out latency p99 (ms, lower is better)"),
        (axes[1][1], [r["rss"] for r in rows], "server peak RSS (MiB, lower is better)"),
    ]  # fmt: skip
    for ax, values, title in panels:
        ax.bar(range(len(rows)), values, color=colors)
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.0f}" if v >= 10 else f"{v:.1f}", (i, v), ha="center", va="bottom",
                        fontsize=8)  # fmt: skip
    rounds = rows[0]["rounds"]
    fig.suptitle(f"durable_asgi vs peers (one uvicorn worker, same Redis; median of {rounds})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--resumes", type=int, default=200)
    parser.add_argument("--fanout", type=int, default=200)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="runs per variant (median shown)")
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "peers.png"))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.chunks, args.resumes, args.fanout, args.rounds = 2000, 20, 20, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.client:
        print(json.dumps(asyncio.run(client(args))))
        return
    results: dict[str, list[dict[str, Any]]] = {}
    with redis_server(args.redis) as redis, tempfile.TemporaryDirectory() as tmp:
        variants = args.variants.split(",")
        if redis is None:
            print("skipping redis, frs, rs: no Redis (install redis-server or pass --redis)")
            variants = [v for v in variants if v not in ("redis", "frs", "rs")]
        if "postgres" in variants and postgres_url() is None:
            print("skipping postgres: no PostgreSQL (set POSTGRES_URL)")
            variants.remove("postgres")
        for n, variant in ((n, v) for n in range(args.rounds) for v in variants):
            print(f"round {n + 1}: {variant} ...", file=sys.stderr, flush=True)
            try:
                results.setdefault(variant, []).append(run_variant(variant, args, redis, Path(tmp)))
                drop_postgres_schemas()
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                stderr = getattr(exc, "stderr", b"") or b""
                tail = (
                    stderr.decode(errors="replace")[-500:]
                    if isinstance(stderr, bytes)
                    else stderr[-500:]
                )
                print(f"{variant} failed: {exc}\n{tail}", file=sys.stderr)
    rows = [median_of(results[v]) for v in variants if v in results]
    print(table(rows, args))
    if args.plot and rows:
        plot(rows, Path(args.plot))
        print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
