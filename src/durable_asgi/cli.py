"""`durable-asgi`: the operator's command line, against any store URL.

    durable-asgi list                                  # $DURABLE_ASGI_STORE
    durable-asgi --store sqlite:///durable.db list --json
    durable-asgi --store redis://localhost:6379/0 show '/api/chat#42' --body > answer.txt
    durable-asgi show '/api/chat#42' --body --offset 1024
    durable-asgi delete '/api/chat#42'
    durable-asgi purge
    durable-asgi --store sqlite:///durable.db stats      # streams by state, bytes, oldest running
    durable-asgi proxy --store sqlite:///proxy.db --allow 'https://api.openai.com/v1/**'

A stream's ID is its store id as `list` prints it: ``<namespace>#<key>`` (the namespace is the
request path by default), or ``sha256:…`` for hashed keys and owner-bound streams. `show`
also prints its ``hash``: the id logs and traces name it by (``docs/operations.md``).

Exit status: 0 done; 1 the stream doesn't exist, or the store failed; 2 a usage error (bad
arguments, no store given, an unknown store URL; for `proxy`, no ``--allow``).

`proxy` runs `durable_asgi.proxy.DurableProxy` on uvicorn (the ``proxy`` extra) until
interrupted; its store defaults to ``$DURABLE_ASGI_STORE``, else memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import anyio

from ._telemetry import stream_hash
from .stores import ENV_VAR, Store, StoreError, StoreStats, StreamInfo, store_from_url

__all__ = ["main"]

#: Bytes per store read when writing a body out.
READ_SIZE = 1 << 20


class CommandError(Exception):
    """Ends the command with a message on stderr and `code` as the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


SECRET_ENV_VAR = "DURABLE_ASGI_PROXY_SECRET"
"""Where ``durable-asgi proxy`` finds its ``--secret`` when it isn't given."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="durable-asgi",
        description="Inspect and manage the streams in a durable_asgi store.",
        epilog=f"The store defaults to ${ENV_VAR}. IDs are as `list` prints them "
        "(<namespace>#<key>, e.g. '/api/chat#42').",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help=f"memory://, sqlite:///path.db or redis://host:6379/0 (default: ${ENV_VAR})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", help="streams with their state, size, age and readers")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    show = commands.add_parser("show", help="one stream's metadata, or its body")
    show.add_argument("id", metavar="ID")
    show.add_argument("--body", action="store_true", help="write the body's bytes to stdout")
    show.add_argument(
        "--offset", type=_offset, default=0, metavar="N", help="with --body: start at byte N"
    )
    show.add_argument("--json", action="store_true", help="metadata as JSON")

    delete = commands.add_parser("delete", help="abort a stream if running and remove it")
    delete.add_argument("id", metavar="ID")

    commands.add_parser("purge", help="remove expired streams now")

    stats = commands.add_parser(
        "stats", help="streams by state, bytes stored, the oldest running stream"
    )
    stats.add_argument("--json", action="store_true", help="as one JSON object")

    proxy = commands.add_parser(
        "proxy",
        help="run the durable proxy (durablefetch's URL scheme) on uvicorn",
        description="Serve GET|POST /{host}/{path} durably from {scheme}://{host}/{path}, "
        "for the upstream URLs the allowlist allows (durablefetch's client works with it).",
    )
    proxy.add_argument(
        "--store",
        metavar="URL",
        default=argparse.SUPPRESS,  # else it would hide a --store given before `proxy`
        help=f"memory://, sqlite:///path.db or redis://host:6379/0 (default: ${ENV_VAR}, "
        "else memory://)",
    )
    proxy.add_argument(
        "--allow",
        metavar="PATTERN",
        nargs="+",
        action="extend",
        default=[],
        help="upstream URLs it may fetch (required), e.g. 'https://api.openai.com/v1/**': "
        "* is one path segment, host label or any port, ** any depth; '**' allows every URL",
    )
    proxy.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    proxy.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    proxy.add_argument("--certfile", metavar="FILE", help="serve HTTPS with this certificate")
    proxy.add_argument("--keyfile", metavar="FILE", help="the certificate's private key")
    proxy.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="trust the CAs in FILE for upstream TLS, instead of the default ones",
    )
    proxy.add_argument(
        "--secret",
        metavar="S",
        help="serve the Durable Streams proxy protocol at /v1/proxy with this service secret "
        f"(default: ${SECRET_ENV_VAR}; unset: not served)",
    )
    return parser


def _offset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte offset: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the offset must not be negative")
    return value


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the CLI (the ``durable-asgi`` entry point) and exit with its status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "proxy":
        _proxy(parser, args)
    url = args.store or os.environ.get(ENV_VAR, "").strip()
    if not url:
        parser.error(f"no store: pass --store URL or set ${ENV_VAR}")
    try:
        store = _open_store(url)
        anyio.run(_run, store, args, backend="asyncio")
    except CommandError as exc:
        print(f"durable-asgi: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except StoreError as exc:
        print(f"durable-asgi: store error: {exc}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # `durable-asgi show --body ID | head`
        sys.stderr.close()
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)


def _proxy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> NoReturn:
    """`durable-asgi proxy`: check the arguments, then serve until interrupted."""
    if not args.allow:
        parser.error(
            "proxy needs --allow PATTERN: it fetches only the upstream URLs an allowlist allows, "
            "e.g. --allow 'https://api.example.com/**' (--allow '**' allows every URL: an open "
            "proxy)"
        )
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("proxy: --certfile and --keyfile go together")
    try:
        import uvicorn

        from .proxy import Allowlist, DurableProxy
    except ImportError as exc:
        parser.error(f'proxy needs the proxy extra ({exc}): pip install "durable-asgi[proxy]"')
    try:
        allow = Allowlist(args.allow)
    except ValueError as exc:
        parser.error(str(exc))
    url = getattr(args, "store", None) or os.environ.get(ENV_VAR, "").strip() or "memory://"
    try:
        store = store_from_url(url)
    except (ValueError, ImportError) as exc:
        parser.error(f"--store {url!r}: {exc}")
    try:
        secret = args.secret or os.environ.get(SECRET_ENV_VAR, "").strip() or None
        app = DurableProxy(allow=allow, store=store, verify=args.ca_bundle or True, secret=secret)
    except OSError as exc:  # an unreadable CA bundle (ssl.SSLError is an OSError)
        parser.error(f"--ca-bundle {args.ca_bundle!r}: {exc}")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        lifespan="on",
    )
    sys.exit(0)


def _open_store(url: str) -> Store:
    try:
        store = store_from_url(url)
    except ValueError as exc:
        raise CommandError(str(exc), 2) from None
    except ImportError as exc:
        raise CommandError(f"{url!r} needs an optional dependency: {exc}", 2) from None
    if urlsplit(url).scheme.lower() == "sqlite":
        # Opening a missing file would create an empty store: say it isn't there instead.
        rest = url[len("sqlite://") :]
        path = unquote(rest[1:] if rest.startswith("/") else rest)
        if not os.path.exists(path):
            raise CommandError(f"no SQLite store at {path!r}")
    return store


async def _run(store: Store, args: argparse.Namespace) -> None:
    try:
        await store.open()
        if args.command == "list":
            await _list(store, args.json)
        elif args.command == "show":
            await _show(store, args.id, args.body, args.offset, args.json)
        elif args.command == "delete":
            if not await store.delete(args.id):
                raise CommandError(f"no stream {args.id!r}")
            print(f"deleted {args.id}")
        elif args.command == "purge":
            print(f"purged {await store.purge_expired()} expired stream(s)")
        elif args.command == "stats":
            await _stats(store, args.json)
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()


# -- commands ---------------------------------------------------------------------------------


async def _list(store: Store, as_json: bool) -> None:
    streams = [info async for info in store.scan()]
    streams.sort(key=lambda info: info.created_at)
    out = sys.stdout
    if as_json:
        for info in streams:
            out.write(json.dumps(_metadata(info)) + "\n")
        return
    now = time.time()
    rows = [("ID", "STATE", "SIZE", "CHUNKS", "READERS", "AGE", "STATUS")]
    rows += [
        (
            info.id,
            info.state,
            _size(info.offset),
            str(info.chunks),
            str(info.readers),
            _duration(now - info.created_at),
            "-" if info.status_code is None else str(info.status_code),
        )
        for info in streams
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")
    out.write(f"{len(streams)} stream(s)\n")


async def _show(store: Store, sid: str, body: bool, offset: int, as_json: bool) -> None:
    info = await store.info(sid)
    if info is None:
        raise CommandError(f"no stream {sid!r}")
    if not body:
        metadata = _metadata(info)
        if as_json:
            print(json.dumps(metadata, indent=2))
        else:
            width = max(map(len, metadata))
            for name, value in metadata.items():
                if name == "headers":
                    value = "\n".join(f"{' ' * (width + 2)}{h}" for h in value or []).lstrip()
                print(f"{name + ':':<{width + 2}}{_when(name, value)}")
        return
    if offset > info.offset:
        raise CommandError(f"offset {offset} is past the end of {sid!r} ({info.offset} bytes)")
    out = sys.stdout.buffer
    # The bytes stored when `show` started (more may arrive while a stream runs).
    end = info.offset
    while offset < end:
        latest, data = await store.read(sid, offset, min(READ_SIZE, end - offset))
        if latest is None or latest.generation != info.generation:
            raise CommandError(f"{sid!r} was deleted or replaced while being read")
        if not data:
            break
        out.write(data)
        offset += len(data)
    out.flush()


async def _stats(store: Store, as_json: bool) -> None:
    stats = getattr(store, "stats", None)
    if stats is None:
        raise CommandError(
            f"{type(store).__name__} can't count its streams (a store answers with a stats() "
            "method: SQLite and Redis do; a memory store lives in its server's process)"
        )
    counts: StoreStats = await stats()
    if as_json:
        print(json.dumps(dataclasses.asdict(counts)))
        return
    for state in ("running", "complete", "failed", "aborted"):
        print(f"{state + ':':<16}{counts.streams.get(state, 0)}")
    print(f"{'bytes:':<16}{_size(counts.bytes)}")
    oldest = counts.oldest_running
    print(f"{'oldest running:':<16}{'-' if oldest is None else _when('started_at', oldest)}")


# -- formatting -------------------------------------------------------------------------------


def _metadata(info: StreamInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "hash": stream_hash(info.id),
        "state": info.state,
        "offset": info.offset,
        "chunks": info.chunks,
        "readers": info.readers,
        "status_code": info.status_code,
        "headers": [
            f"{name.decode('latin-1')}: {value.decode('latin-1')}"
            for name, value in info.headers or ()
        ],
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "expires_at": info.expires_at,
        "lease_expires_at": info.lease_expires_at,
        "retain": info.retain,
    }


def _when(name: str, value: Any) -> str:
    if name.endswith("_at") and isinstance(value, float):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        delta = value - time.time()
        relative = f"in {_duration(delta)}" if delta > 0 else f"{_duration(-delta)} ago"
        return f"{stamp} ({relative})"
    return "-" if value is None else str(value)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for length, suffix in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= length:
            return f"{seconds / length:.1f}{suffix}"
    return f"{seconds:.0f}s"


if __name__ == "__main__":
    main()
