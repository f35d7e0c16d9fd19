"""``response_format``: what a job may ask its answer to be, checked before anything is stored or queued.

OpenAI's shapes: ``{"type": "text"}`` (the default: free text), ``{"type": "json_object"}`` (any JSON
object) and ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`` (an
object valid against the schema). The worker enforces them token by token (``workers.engine.grammar``).

A schema is refused with ``invalid_schema``, naming what is wrong, when it is not a valid JSON Schema
(``jsonschema``'s metaschema check) or when the grammar library cannot enforce it (xgrammar compiles it
here, without a tokenizer, where it is installed: the gateway and the worker install it; a producer
without it leaves that part of the check to the worker, which fails the job with the same code).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from pydantic_core import PydanticCustomError

TYPES = ("text", "json_object", "json_schema")
#: OpenAI's rule for ``json_schema.name``.
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Most characters of a schema, as JSON: a sanity cap far above any real schema.
MAX_SCHEMA_CHARS = 65_536
FIELDS = {"name", "schema", "strict", "description"}


def checked(value: Any) -> dict[str, Any] | None:
    """The response format as the worker takes it (None for free text), or a validation error: a
    ``ValueError`` for a malformed shape, an ``invalid_schema`` error for a schema that cannot be enforced."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in TYPES:
        raise ValueError(f"response_format must be an object whose type is one of {', '.join(TYPES)}")
    kind = value["type"]
    if kind == "text":
        _only(value, {"type"})
        return None
    if kind == "json_object":
        _only(value, {"type"})
        return {"type": kind}
    _only(value, {"type", "json_schema"})
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not NAME.match(spec["name"]):
        raise ValueError("response_format.json_schema needs a name of 1-64 letters, digits, _ or -")
    if set(spec) - FIELDS:
        raise ValueError(f"response_format.json_schema has unknown fields: {', '.join(sorted(set(spec) - FIELDS))}")
    if not isinstance(spec.get("schema"), dict):
        raise ValueError("response_format.json_schema.schema must be a JSON Schema object")
    if spec.get("strict") not in (None, True, False) or not isinstance(spec.get("description", ""), str):
        raise ValueError("response_format.json_schema.strict must be a boolean and description a string")
    check_schema(spec["schema"])
    return {"type": kind, "json_schema": dict(spec)}


def check_schema(schema: dict[str, Any], where: str = "response_format") -> None:
    """Raise an ``invalid_schema`` error unless ``schema`` is a JSON Schema the grammar library enforces; its
    message starts with ``where`` (the request field the schema came from)."""
    text = json.dumps(schema, ensure_ascii=False, sort_keys=True)
    if len(text) > MAX_SCHEMA_CHARS:
        raise _invalid(where, f"the schema is {len(text)} characters as JSON; the limit is {MAX_SCHEMA_CHARS}")
    problem = _problem(text)
    if problem is not None:
        raise _invalid(where, problem)


@functools.lru_cache(maxsize=256)
def _problem(text: str) -> str | None:
    """Why the schema ``text`` cannot be enforced, or None. Cached: clients send the same schemas and tools with
    every request, and the metaschema check alone costs ~5 ms for a 6-field schema (measured)."""
    import jsonschema

    schema = json.loads(text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "the schema"
        return f"not a valid JSON Schema at {at}: {exc.message}"
    try:
        import xgrammar
    except ImportError:  # a producer without the grammar library: the worker checks the rest
        return None
    try:
        xgrammar.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
    except RuntimeError as exc:  # its C++ errors end with what it lacks ("Lookbehind is not supported yet.")
        return "the grammar library cannot enforce it: " + str(exc).strip().rsplit(": ", 1)[-1]
    return None


def _only(value: dict[str, Any], allowed: set[str]) -> None:
    extra = set(value) - allowed
    if extra:
        raise ValueError(f"response_format of type {value['type']} takes no {', '.join(sorted(extra))}")


def _invalid(where: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_schema", "{where}: {detail}", {"where": where, "detail": message})


def schema_error(errors: list[Any]) -> bool:
    """A pydantic validation error's first problem is an unenforceable schema (its code is ``invalid_schema``)."""
    return bool(errors) and errors[0].get("type") == "invalid_schema"
