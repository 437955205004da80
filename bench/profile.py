"""Profile the server under one benchmark workload with py-spy, and print where its time goes.

    python bench/profile.py                       # memory store, token pace
    python bench/profile.py --store sqlite --workload flat --top 30
    python bench/profile.py --proxy memory --mode 2 --sessions 30   # bench/proxy.py's workload

Serves `bench/app.py` exactly as `bench/run.py` does (one uvicorn worker), records it with
``py-spy record`` (``pip install py-spy``) while the workload runs, and prints the functions
with the most samples, by their own time and including what they call. The raw profile is kept
(``--out``, speedscope format: open it at speedscope.app, or read it with this script).
With ``--proxy`` it serves ``bench/proxy_app.py`` (``pass-through``, or the durable proxy on a
store) and runs one round of `bench/proxy.py`'s workload instead (``--mode``, ``--sessions``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

import proxy


def stores(tmp: Path) -> dict[str, str]:
    return {
        "bare": "bare",
        "memory": "memory://",
        "sqlite": f"sqlite:///{tmp / 'profile.db'}",
        "redis": run.redis_url() or "redis://127.0.0.1:6379/15",
    }


def summary(path: Path, top: int) -> str:
    """The `top` frames by own samples and by inclusive samples, from a speedscope file."""
    data = json.loads(path.read_text())
    # py-spy names a frame by its line: count functions, not lines.
    functions = [
        f"{f['name']} ({'/'.join(Path(f.get('file', '?')).parts[-2:])})"
        for f in data["shared"]["frames"]
    ]
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0.0
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:  # idle
                continue
            samples += weight
            own[functions[stack[-1]]] += weight
            for function in {functions[i] for i in stack}:
                total[function] += weight

    lines = [f"{samples:.2f} s sampled"]
    for title, counter in (("own time", own), ("including callees", total)):
        lines.append(f"\ntop {top} by {title}:")
        for frame, weight in counter.most_common(top):
            lines.append(f"  {weight / samples * 100:5.1f}%  {frame}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--store", default="memory", choices=["bare", "memory", "sqlite", "redis"])
    parser.add_argument("--workload", default="token", choices=["token", "flat"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", default=None, help="keep the speedscope profile here")
    parser.add_argument(
        "--proxy", choices=["pass-through", *proxy.STORES], help="profile bench/proxy.py instead"
    )
    parser.add_argument("--mode", type=int, default=2, choices=(1, 2), help="with --proxy")
    parser.add_argument("--sessions", type=int, default=100, help="with --proxy")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    tmp = Path(tempfile.mkdtemp(prefix="durable-profile-"))
    out = Path(args.out) if args.out else tmp / "profile.json"
    workload = run.main_workloads()[args.workload]
    loop = asyncio.new_event_loop()
    try:
        with contextlib.ExitStack() as stack:
            if args.proxy:
                upstream = stack.enter_context(proxy.serve("upstream", "httptools"))
                variant = "passthrough" if args.proxy == "pass-through" else stores(tmp)[args.proxy]
                server = stack.enter_context(
                    proxy.serve(variant, "httptools", f"http://127.0.0.1:{upstream.port}")
                )
                n = str(args.sessions)
                options = proxy.parse(["--mode", str(args.mode), "--sessions", n, "--warm-up", "0"])
                mode = args.mode if args.proxy != "pass-through" else 1
                # Warmed up before py-spy starts, as bench/proxy.py --warm-up N does.
                loop.run_until_complete(
                    proxy.sessions(server.port, upstream.port, args.sessions, 0, False, mode)
                )
            else:
                server = stack.enter_context(run.serve(stores(tmp)[args.store], "httptools"))
                run.warm_up(loop, server, durable=args.store != "bare")
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "speedscope",
                    "--output",
                    str(out),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # py-spy attaches
            if args.proxy:
                durable = args.proxy != "pass-through"
                row = proxy.run_round(loop, server, upstream, options, durable).as_dict()
                what = f"{args.proxy} / mode {args.mode if durable else 1} / {args.sessions}"
                ttfb = row["ttfb_ms"]
                what += f": TTFB p50 {ttfb['p50']:.1f} ms, p99 {ttfb['p99']:.1f} ms"
                rate, units, expected = (
                    row["events"] / row["wall_s"],
                    row["events"],
                    row["expected"],
                )
                us = row["server_us_per_event"]
            else:
                result = run.run_streams(loop, server, workload, durable=args.store != "bare")
                what, rate, units = f"{args.store} / {args.workload}", result.rate, result.units
                us, expected = result.us_per_unit, result.expected
            spy.send_signal(subprocess.signal.SIGINT)
            spy.wait(30)
        print(f"{what}: {us:.1f} us/event, {rate:,.0f} events/s, {units:,}/{expected:,} delivered")
        print(summary(out, args.top))
    finally:
        loop.close()
        if not args.out:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
