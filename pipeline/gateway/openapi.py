"""The OpenAPI document's JSON bodies for the routes that read their body themselves (after the API key is
checked, so a body is never parsed for a stranger): chat completions, responses, batches."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` that documents ``model`` as the route's required JSON body."""
    schema = inline(model.model_json_schema(ref_template="#/$defs/{model}"))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` written in place (the document has nowhere else to put them)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return dict(resolve(schema))
