"""Fixtures of the proxy tests: a real upstream (`Origin`) and the proxy under real uvicorns.

    async def test_x(serve: Serve) -> None:
        with serve() as s:                       # DurableProxy(allow=[upstream/**], store=...)
            result = await fetch(s.url, s.path("/sse?id=1"))

`certs` is a test CA and a server certificate for the TLS tests (the npm clients'). `store` runs
each test on memory, SQLite and Redis (Redis skips without a redis-server, except
under CI); a test that needs only one names it: ``@pytest.mark.parametrize("store",
["memory"], indirect=True)``. The client side runs on asyncio (the servers run their own loops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from durable_asgi import MemoryStore, SQLiteStore, Store
from durable_asgi._types import ASGIApp
from durable_asgi.proxy import DurableProxy

from ..support.browser import launched_chromium
from ..support.servers import running_server
from ..support.stores import Ids, redis_factory
from ..support.tls import Certificates, make_certificates
from .harness import Serve, Setup
from .upstream import Origin


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store of each kind, opened and closed by the proxy's lifespan."""
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        yield SQLiteStore(tmp_path / "proxy.db")
    else:
        make, clean = redis_factory(request, Ids())
        try:
            yield make()
        finally:
            clean()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (the browser tests'), once per module."""
    with launched_chromium() as chromium:
        yield chromium


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A test CA, and a certificate it signed for 127.0.0.1, 127.0.0.2 and localhost."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def origin() -> Iterator[tuple[Origin, str]]:
    """The upstream app, serving on a free loopback port."""
    app = Origin()
    with running_server(app) as server:
        yield app, server.url


@pytest.fixture
def serve(origin: tuple[Origin, str], store: Store) -> Serve:
    """Starts the proxy (options as keywords; `allow` defaults to every origin URL; `mount`
    wraps it in a host app) on uvicorn, once per test."""
    app, upstream = origin

    @contextlib.contextmanager
    def start(
        *,
        allow: list[str] | None = None,
        mount: Callable[[DurableProxy], ASGIApp] | None = None,
        **options: Any,
    ) -> Iterator[Setup]:
        proxy = DurableProxy(allow=allow or [f"{upstream}/**"], store=store, **options)
        with running_server(mount(proxy) if mount else proxy) as server:
            yield Setup(app, proxy, server.url, upstream)

    return start
