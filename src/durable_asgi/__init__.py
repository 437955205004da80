"""durable_asgi: durable, resumable streaming HTTP responses for any ASGI app."""
