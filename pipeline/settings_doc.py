"""docs/configuration.md, generated from the settings classes' ``#:`` comments.

    python -m tuwen.pipeline.settings_doc > docs/configuration.md

A test fails when the page and the code differ, so a setting cannot go undocumented.
"""

from __future__ import annotations

import inspect
import re
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_settings import BaseSettings

from tuwen.pipeline.settings import Settings

_FIELD = re.compile(r"^    (\w+): ")
_SECTION = re.compile(r"^    # -- (.+?) -+$")


def _default(cls: type[BaseSettings], name: str) -> str:
    field = cls.model_fields[name]
    if isinstance(field.json_schema_extra, dict) and "shown_default" in field.json_schema_extra:
        return str(field.json_schema_extra["shown_default"])  # a default that depends on who runs it
    value: Any = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return "(unset)"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        value = str(value).lower()
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value)) or "(empty)"
    if isinstance(value, Path):
        value = str(value)
    return f"`{value}`"


def table(cls: type[BaseSettings], prefix: str) -> str:
    """A Markdown table per ``# -- section --`` of the class, one row per field with its ``#:`` text."""
    out: list[str] = []
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if section := _SECTION.match(line):
            out += ["", f"**{section.group(1)}**", "", "| variable | default | meaning |", "|---|---|---|"]
        elif stripped.startswith("#:"):
            comment.append(stripped[2:].strip())
        elif (field := _FIELD.match(line)) and field.group(1) in cls.model_fields:
            name = field.group(1)
            if not out:
                out += ["| variable | default | meaning |", "|---|---|---|"]
            meaning = " ".join(comment).replace("|", "\\|")
            out.append(f"| `{prefix}{name.upper()}` | {_default(cls, name)} | {meaning} |")
            comment = []
        elif not stripped.startswith("#"):
            comment = []
    return "\n".join(out).strip()


def page() -> str:
    from tuwen.pipeline.gateway.batch_settings import BatchSettings
    from tuwen.pipeline.gateway.settings import GatewaySettings
    from tuwen.pipeline.gateway.webhooks import WebhookSettings

    return "\n".join([
        "# Configuration", "",
        "Every setting is a `TUWEN_*` environment variable, read once at each entry point (worker, client, CLI,",
        "gateway) into one settings object and passed down. This page is generated from the code",
        "(`python -m tuwen.pipeline.settings_doc`); a test keeps the two equal.", "",
        "## Everything (`tuwen.pipeline.settings.Settings`)", "", table(Settings, "TUWEN_"), "",
        "## The HTTP gateway (`tuwen.pipeline.gateway.settings.GatewaySettings`)", "",
        "The gateway reads the settings above too.", "", table(GatewaySettings, "TUWEN_"), "",
        "## The Batch API (`tuwen.pipeline.gateway.batch_settings.BatchSettings`, read by the gateway)", "",
        table(BatchSettings, "TUWEN_"), "",
        "## Webhooks (`tuwen.pipeline.gateway.webhooks.WebhookSettings`, read by the gateway)", "",
        table(WebhookSettings, "TUWEN_"), "",
    ])


if __name__ == "__main__":
    print(page(), end="")
