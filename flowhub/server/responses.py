"""The response value every route returns, and builders for the common shapes."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
DOCS_URL = "https://docs.github.com/rest"


@dataclass
class FileBody:
    """``length`` bytes of the file at ``path`` starting at ``offset``."""

    path: str
    offset: int
    length: int


@dataclass
class Response:
    """Status, headers and a body held either in memory or as a file slice.

    ``Content-Length`` is added by the writer from the body; ``no_body`` marks statuses (304)
    that carry none.
    """

    status: int
    headers: List[Tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    file: Optional[FileBody] = None
    no_body: bool = False

    @property
    def length(self) -> int:
        return self.file.length if self.file is not None else len(self.body)

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def json_response(status: int, data: Any,
                  headers: Optional[List[Tuple[str, str]]] = None) -> Response:
    """A JSON body with GitHub's content type."""
    body = json.dumps(data, indent=2).encode("utf-8") + b"\n"
    return Response(status, [("Content-Type", JSON_TYPE), *(headers or [])], body)


def api_error(status: int, message: str) -> Response:
    """GitHub's error shape: ``{"message": ..., "documentation_url": ...}``."""
    return json_response(status, {"message": message, "documentation_url": DOCS_URL})


def html_response(status: int, title: str, text: str = "",
                  headers: Optional[List[Tuple[str, str]]] = None) -> Response:
    """A tiny HTML page."""
    page = (
        f"<!DOCTYPE html>\n<html><head><title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>\n"
    )
    return Response(status, [("Content-Type", HTML_TYPE), *(headers or [])], page.encode())


def not_found() -> Response:
    """The web 404 page (API routes use :func:`api_error`)."""
    return html_response(404, "Not Found", "This is not the web page you are looking for.")


def redirect(location: str, status: int = 302) -> Response:
    """A redirect with a small HTML body pointing at ``location``."""
    return html_response(status, "Redirecting", location, [("Location", location)])
