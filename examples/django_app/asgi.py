"""The Django chat example's ASGI entry point, wrapped with DurableMiddleware.

Run it (from the repository root)::

    uvicorn examples.django_app.asgi:application

Only views decorated with ``@durable`` are durable (``routes="decorated"``): here the chat
view in ``views.py``, keyed by the page's ``Durable-Key`` header. Everything else passes
straight through to Django. The store is the SQLite file
``durable-demo.db`` unless ``DURABLE_ASGI_STORE`` names another (``memory://``, ``redis://…``).
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from durable_asgi import DurableMiddleware, store_from_url

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")

application = DurableMiddleware(
    get_asgi_application(),
    store=store_from_url(os.environ.get("DURABLE_ASGI_STORE", "sqlite:///durable-demo.db")),
    routes="decorated",  # the key and ttl come from @durable on the view
)
