"""A URLconf nothing imports in advance, as in a real project: Django imports it (and so the
`@durable` views) when it resolves its first request."""

from __future__ import annotations

from django.urls import path

from . import lazy_views

urlpatterns = [path("lazy/", lazy_views.lazy)]
