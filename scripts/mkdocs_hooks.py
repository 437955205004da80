"""mkdocs hooks for the docs site (see ``hooks:`` in mkdocs.yml).

Our docstrings introduce examples reST-style (``Example::`` then an indented block), which reads
well in ``help()`` and in the source. Markdown already renders the indented block as code; this
drops the second colon that reST would have eaten, so the API pages read "Example:".
"""

from __future__ import annotations

import re
from typing import Any

_LITERAL_INTRO = re.compile(r"::</p>")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _LITERAL_INTRO.sub(":</p>", html)
