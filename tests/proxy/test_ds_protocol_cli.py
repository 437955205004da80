"""`durable-asgi proxy --secret S` (or ``$DURABLE_ASGI_PROXY_SECRET``) enables mode 2."""

from __future__ import annotations

from typing import Any

import pytest
import uvicorn

from durable_asgi.cli import main
from durable_asgi.proxy import DurableProxy


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append(app))
    monkeypatch.delenv("DURABLE_ASGI_STORE", raising=False)
    monkeypatch.delenv("DURABLE_ASGI_PROXY_SECRET", raising=False)
    return calls


def _serve(*argv: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["proxy", "--allow", "**", *argv])
    assert exited.value.code == 0


def test_secret_flag(served: list[Any]) -> None:
    _serve("--secret", "S")
    (app,) = served
    assert isinstance(app, DurableProxy) and app.streams is not None
    assert app.streams.secret == "S"


def test_secret_from_the_environment(served: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_ASGI_PROXY_SECRET", "from-env")
    _serve()
    assert served[0].streams.secret == "from-env"


def test_no_secret_no_mode_2(served: list[Any]) -> None:
    _serve()
    assert served[0].streams is None
