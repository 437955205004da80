"""The Django chat example's ASGI entry point, wrapped with DurableMiddleware.

Run it (from the repository root)::

    uvicorn examples.django_app.asgi:application

Requests that carry a ``Durable-Key`` header (the page's ``POST /api/chat``) are durable;
everything else passes straight through to Django. The store is the SQLite file
``durable-demo.db`` unless ``DURABLE_ASGI_STORE`` names another (``memory://``, ``redis://…``).
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from durable_asgi import DurableMiddleware, keys, store_from_url

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")

application = DurableMiddleware(
    get_asgi_application(),
    store=store_from_url(os.environ.get("DURABLE_ASGI_STORE", "sqlite:///durable-demo.db")),
    key=keys.header("Durable-Key"),
)
