"""URLs of the test project."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("chat/<str:chat_id>/", views.chat),
    path("sync/", views.chat_sync),
    path("class/", views.ChatView.as_view()),
    path("plain/", views.plain),
]
