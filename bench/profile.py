"""Profile the server under one benchmark workload with py-spy, and print where its time goes.

    python bench/profile.py                       # memory store, token pace
    python bench/profile.py --store sqlite --workload flat --top 30

Serves `bench/app.py` exactly as `bench/run.py` does (one uvicorn worker), records it with
``py-spy record`` (``pip install py-spy``) while the workload runs, and prints the functions
with the most samples, by their own time and including what they call. The raw profile is kept
(``--out``, speedscope format: open it at speedscope.app, or read it with this script).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run


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
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    tmp = Path(tempfile.mkdtemp(prefix="durable-profile-"))
    out = Path(args.out) if args.out else tmp / "profile.json"
    workload = run.main_workloads()[args.workload]
    loop = asyncio.new_event_loop()
    try:
        with run.serve(stores(tmp)[args.store], "httptools") as server:
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
            result = run.run_streams(loop, server, workload, durable=args.store != "bare")
            spy.send_signal(subprocess.signal.SIGINT)
            spy.wait(30)
        print(
            f"{args.store} / {args.workload}: {result.us_per_unit:.1f} us/event, "
            f"{result.rate:,.0f} events/s, {result.units:,}/{result.expected:,} delivered"
        )
        print(summary(out, args.top))
    finally:
        loop.close()
        if not args.out:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
