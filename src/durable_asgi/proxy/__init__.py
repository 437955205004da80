"""`durable_asgi.proxy`: a durable HTTP proxy on the same engine and stores as the middleware.

For upstreams that aren't Python apps (an OpenAI-compatible server, a Node service): the proxy
fetches each upstream URL once, tees the answer into the store while it streams, keeps
fetching when the client leaves, and serves every later request for that URL from the store,
then live. It speaks durablefetch's URL scheme, so durablefetch's npm client works against it
unchanged. An upstream allowlist is mandatory. With ``secret=`` it also speaks the Durable
Streams proxy protocol at ``/v1/proxy`` (mode 2, `DurableStreams`), for the official Durable
Streams clients.

Example::

    from durable_asgi import SQLiteStore
    from durable_asgi.proxy import DurableProxy

    proxy = DurableProxy(allow=["https://api.openai.com/v1/**"], store=SQLiteStore("proxy.db"))
    # uvicorn app:proxy   — or, with no code: durable-asgi proxy --allow 'https://...' ...

Needs the ``proxy`` extra: ``pip install "durable-asgi[proxy]"``.
"""

from ._allow import Allowlist
from ._app import DOCS_URL, DurableProxy
from ._ds import BASE_PATH, DurableStreams, sign
from ._durablefetch import NAMESPACE
from ._upstream import DEFAULT_LIMITS, DEFAULT_TIMEOUT, UpstreamError
from ._url import Upstream, parse_upstream

__all__ = [
    "BASE_PATH",
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUT",
    "DOCS_URL",
    "NAMESPACE",
    "Allowlist",
    "DurableProxy",
    "DurableStreams",
    "Upstream",
    "UpstreamError",
    "parse_upstream",
    "sign",
]
