"""The admin API's OpenAPI document: valid OpenAPI 3.1, and in step with the routes."""

from __future__ import annotations

from typing import Any

import pytest

from relay import admin
from relay.admin import OPENAPI_PATH, build

yaml = pytest.importorskip("yaml")
METHODS = {"get", "post", "put", "patch", "delete"}


def _doc() -> dict[str, Any]:
    doc = yaml.safe_load(OPENAPI_PATH.read_text())
    assert isinstance(doc, dict)
    return doc


def test_document_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    doc = _doc()
    assert doc["openapi"].startswith("3.1")
    validator.validate(doc)


class _Gw:
    """build() only keeps the gateway for later requests; the route table needs nothing."""


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    api = build(_Gw())
    registered = {(r.method, r.pattern) for r in api.routes}
    documented = {
        (method.upper(), path)
        for path, item in _doc()["paths"].items()
        for method in item if method in METHODS
    }
    assert registered == documented
    assert len(registered) == len(admin.ROUTES) + len(admin.PUBLIC_ROUTES)


def test_only_the_document_is_public() -> None:
    doc = _doc()
    assert doc["security"] == [{"adminToken": []}]
    public = {(m.upper(), p) for p, item in doc["paths"].items() for m, op in item.items()
              if m in METHODS and op.get("security") == []}
    assert public == {(m, p) for m, p, _ in admin.PUBLIC_ROUTES}
    api = build(_Gw())
    assert {(r.method, r.pattern) for r in api.routes if r.guard is None} == public


def test_path_parameters_are_declared() -> None:
    import re

    for path, item in _doc()["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        declared: set[str] = set()
        for p in item.get("parameters", []):
            declared.add(_resolve(p)["name"])
        for method, op in item.items():
            if method in METHODS:
                got = declared | {_resolve(p)["name"] for p in op.get("parameters", [])
                                  if _resolve(p)["in"] == "path"}
                assert names <= got, (path, method, names - got)


def _resolve(p: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in p:
        name = p["$ref"].rsplit("/", 1)[1]
        return _doc()["components"]["parameters"][name]
    return p
