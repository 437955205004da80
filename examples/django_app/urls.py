from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.index),
    path("api/chat", views.chat),
    path("api/stats", views.stats),
]
