"""Settings for the test project (applied by `tests.test_decorator.django_app`)."""

from __future__ import annotations

SECRET_KEY = "durable-asgi-tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.support.django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
