"""``/v1/models``: the models that live workers hold, in OpenAI's list format (which model a request's
``model`` names: ``gateway.served``)."""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from tuwen.pipeline.gateway.deps import Reader, State
from tuwen.pipeline.gateway.openai_errors import OpenAIRoute, openai_error
from tuwen.pipeline.gateway.served import cards
from tuwen.pipeline.openai_objects import ModelCard, ModelList, error_responses

router = APIRouter(prefix="/v1/models", tags=["chat"], route_class=OpenAIRoute)


@router.get("", response_model=ModelList, summary="模型列表 · the models live workers hold",
            responses=error_responses(401, 503))
async def list_models(_: Reader, state: State) -> ModelList:
    """The model ids of live workers, then the aliases that name the served model (`tuwen` …)."""
    return ModelList(data=await run_in_threadpool(cards, state))


@router.get("/{model:path}", response_model=ModelCard, summary="一个模型 · one model",
            responses=error_responses(401, 404, 503))
async def get_model(_: Reader, state: State, model: str) -> ModelCard:
    """A model of the list, or 404 `model_not_found`."""
    for card in await run_in_threadpool(cards, state):
        if card.id == model:
            return card
    raise openai_error("model_not_served", f"The model `{model}` does not exist", param="model")
