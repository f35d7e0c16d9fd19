"""Which model a request names: a live worker's model id, or an alias of the served model (``tuwen`` and
``TUWEN_GATEWAY_MODEL_ALIASES``), from the workers' announcements; ``GET /v1/models`` lists them."""

from __future__ import annotations

import time

from tuwen.pipeline.gateway.openai_errors import openai_error
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.openai_objects import ModelCard
from tuwen.pipeline.registry import no_worker

#: Always a name for the served model, whatever its checkpoint.
ALIAS = "tuwen"
#: ``Retry-After`` of the 503 for no live worker: the SDKs retry twice, honouring it, before they raise; with 5 s
#: the openai SDK took 10-12 s to show the message, and a worker takes longer than that to start anyway.
NO_WORKER_RETRY_S = 1

def aliases(state: GatewayState) -> list[str]:
    return [ALIAS, *(a for a in state.gw.gateway_model_aliases if a != ALIAS)]


def cards(state: GatewayState) -> list[ModelCard]:
    """The live workers' models (on this gateway's interactive queue), oldest first, then the aliases: listed
    even while no worker is live (a request then gets 503 ``model_not_served``, to come back later)."""
    live = state.census.models(state.settings.interactive_queue)
    found = [ModelCard(id=model, created=int(seen)) for model, seen in live.items()]
    created = found[0].created if found else int(time.time())
    return found + [ModelCard(id=name, created=created) for name in aliases(state) if name not in live]


def hears(state: GatewayState) -> None:
    """A spoken question is queued only while a speech worker is live: else a 503 that says what to start (the
    request would wait out its timeout for nothing)."""
    missing = state.census.missing(state.settings.speech_queue)
    if missing:
        raise openai_error("model_not_served", f"no speech model is served now: {missing}",
                           headers={"Retry-After": str(NO_WORKER_RETRY_S)}, status=503)


def served_model(state: GatewayState, requested: str) -> str:
    """The model id a chat request gets: ``requested`` if a live worker holds it; for an alias, the
    longest-served live model. 404 ``model_not_found`` for another name; 503 when no worker is live."""
    live = state.census.models(state.settings.interactive_queue)
    if requested in live:
        return requested
    if not live:
        raise openai_error("model_not_served", f"no model is served now: {no_worker(state.settings.interactive_queue)}",
                           headers={"Retry-After": str(NO_WORKER_RETRY_S)}, status=503)
    if requested in aliases(state):
        return next(iter(live))
    raise openai_error("model_not_served", f"The model `{requested}` does not exist: GET /v1/models lists the "
                       "served ones", param="model")
