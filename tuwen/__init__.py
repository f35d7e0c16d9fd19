"""tuwen (图文): Chinese visual question answering on a message queue.

Everything lives under this one name: ``tuwen.storage`` (where bytes live), ``tuwen.pipeline`` (the
contract and the producer side) and ``tuwen.workers`` (the model side, the only torch importer).
``from tuwen import Client`` is the short path to the producer's client; it is imported on first use,
so ``import tuwen.pipeline.schema`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuwen.pipeline.client import Client

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from tuwen.pipeline.client import Client

        return Client
    raise AttributeError(f"module 'tuwen' has no attribute {name!r}")
