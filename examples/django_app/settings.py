"""Minimal settings for the Django chat example: no database, no apps, no templates."""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "durable-asgi-example-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "examples.django_app.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []  # the chat API takes JSON from our own page; no sessions, no CSRF
DATABASES: dict[str, object] = {}
USE_TZ = True
