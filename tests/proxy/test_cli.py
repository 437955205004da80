"""`durable-asgi proxy`: its arguments, and what it hands uvicorn (not run here: the proxy
itself is served by the other proxy tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import uvicorn

from durable_asgi import MemoryStore, SQLiteStore
from durable_asgi.cli import main
from durable_asgi.proxy import DurableProxy


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    return int(exited.value.code or 0), capsys.readouterr().err


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """What `uvicorn.run` was called with (it returns at once)."""
    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    monkeypatch.delenv("DURABLE_ASGI_STORE", raising=False)
    return calls


def test_it_refuses_to_start_without_an_allowlist(
    capsys: pytest.CaptureFixture[str], served: list[Any]
) -> None:
    code, err = run(capsys, "proxy", "--store", "memory://")
    assert code == 2 and not served
    assert "proxy needs --allow PATTERN" in err and "--allow '**'" in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--allow", "https://x.test"], "invalid allowlist pattern"),
        (["--allow", "**", "--certfile", "cert.pem"], "--certfile and --keyfile go together"),
        (["--allow", "**", "--store", "nope://"], "unknown store URL"),
        (["--allow", "**", "--ca-bundle", "/nonexistent/ca.pem"], "--ca-bundle"),
        (["--allow", "**", "--port", "http"], "invalid int value"),
    ],
)
def test_bad_arguments_exit_2_saying_why(
    capsys: pytest.CaptureFixture[str], served: list[Any], argv: list[str], words: str
) -> None:
    code, err = run(capsys, "proxy", *argv)
    assert code == 2 and not served
    assert words in err


def test_it_serves_the_proxy_on_uvicorn(
    capsys: pytest.CaptureFixture[str], served: list[Any], tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'proxy.db'}"
    argv = ["proxy", "--store", store, "--allow", "https://a.test/**", "http://b.test:*/**"]
    argv += ["--host", "0.0.0.0", "--port", "9000", "--certfile", "c.pem", "--keyfile", "k.pem"]
    code, _ = run(capsys, *argv)
    assert code == 0
    [(app, options)] = served
    assert isinstance(app, DurableProxy) and isinstance(app.store, SQLiteStore)
    assert app.allowlist.patterns == ("https://a.test/**", "http://b.test:*/**")
    assert options == {
        "host": "0.0.0.0",
        "port": 9000,
        "ssl_certfile": "c.pem",
        "ssl_keyfile": "k.pem",
        "lifespan": "on",
    }


def test_the_store_may_come_first_or_from_the_environment(
    capsys: pytest.CaptureFixture[str],
    served: list[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (
        run(capsys, "--store", f"sqlite:///{tmp_path / 'a.db'}", "proxy", "--allow", "**")[0] == 0
    )
    assert isinstance(served[-1][0].store, SQLiteStore)
    assert run(capsys, "proxy", "--allow", "**")[0] == 0
    assert isinstance(served[-1][0].store, MemoryStore)  # nothing named: memory
    monkeypatch.setenv("DURABLE_ASGI_STORE", f"sqlite:///{tmp_path / 'b.db'}")
    assert run(capsys, "proxy", "--allow", "**")[0] == 0
    assert isinstance(served[-1][0].store, SQLiteStore)
