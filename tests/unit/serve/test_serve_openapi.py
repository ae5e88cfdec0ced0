"""The Gateway's FastAPI app documents every route and request body (OpenAPI), without Ray."""

from __future__ import annotations

import json

from rmserve.serve.config.settings import ServerConfig
from rmserve.serve.edge.endpoints import ENDPOINTS
from rmserve.serve.edge.routes import create_http_app
from rmserve.serve.edge.service import GatewayService


def openapi() -> dict:
    config = ServerConfig()
    return create_http_app(GatewayService([None], config), config).openapi()


def test_every_scoring_route_of_the_table_is_documented():
    paths = openapi()["paths"]
    for endpoint in ENDPOINTS:
        for path in endpoint.paths:
            path = path.replace(":path", "")
            body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            refs = [body] if "$ref" in body else body["oneOf"]
            assert f"#/components/schemas/{endpoint.request.__name__}" in [ref["$ref"] for ref in refs]
            statuses = set(paths[path]["post"]["responses"])
            assert {"200", "400", "401", "413", "422", "429", "500", "503", "504"} <= statuses
    # /v1/rerank takes two bodies (rmserve's groups and the Cohere/Jina shape)
    assert len(paths["/v1/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"]) == 2
    for path in ("/health", "/ready", "/v1/models"):
        assert "get" in paths[path]


def test_every_reference_resolves():
    document = openapi()
    schemas = document["components"]["schemas"]
    refs = {
        value.split("/")[-1]
        for value in _walk(document)
        if isinstance(value, str) and value.startswith("#/components/schemas/")
    }
    assert refs and refs <= set(schemas), refs - set(schemas)
    assert {"ScoreRequest", "PairItem", "ConversationItem", "TextItem", "TokensItem", "Message"} <= set(schemas)
    assert schemas["ScoreRequest"]["additionalProperties"] is False
    json.dumps(document)  # serialisable


def _walk(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    else:
        yield node
