"""The console's scripts and stylesheets under content-hashed URLs, served `immutable`.

The files are read once at start; each is served at /console/static/<hash>/<name>, where
<hash> is the first 12 hex digits of its SHA-256, so a new release never meets a stale
cached copy and a browser never asks twice. An unknown hash is a 404 (never a different
version of the file).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/console/static/"
_TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8",
          ".svg": b"image/svg+xml", ".png": b"image/png", ".ico": b"image/x-icon"}


class Static:
    def __init__(self, directory: Path = STATIC_DIR) -> None:
        self.files: dict[str, tuple[bytes, bytes]] = {}
        self.urls: dict[str, str] = {}
        for p in sorted(directory.iterdir()):
            if not p.is_file() or p.suffix not in _TYPES:
                continue
            data = p.read_bytes()
            digest = hashlib.sha256(data).hexdigest()[:12]
            url = f"{PREFIX}{digest}/{p.name}"
            self.urls[p.name] = url
            self.files[url] = (data, _TYPES[p.suffix])

    def url(self, name: str) -> str:
        return self.urls[name]

    def serve(self, path: str) -> Any:
        if not path.startswith(PREFIX):
            return None
        from relay.console.web import Refused, Response

        hit = self.files.get(path)
        if hit is None:
            raise Refused(404, "This file does not exist.")
        return Response(200, hit[0], hit[1], [
            (b"cache-control", b"public, max-age=31536000, immutable"),
            (b"x-content-type-options", b"nosniff"),
        ])
