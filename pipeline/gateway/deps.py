"""What routes depend on, read from ``request.app.state`` (FastAPI ``Depends``): the gateway's shared
state, the API key a request authenticates with (checked from the headers alone, before any body is
read), the rate limit, and the job id of a path."""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tuwen.pipeline.gateway.apikeys import ApiKey
from tuwen.pipeline.gateway.errors import ApiError
from tuwen.pipeline.gateway.models import EXAMPLE_JOB_ID
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.schema import JOB_ID_MAX, JOB_ID_MIN, JOB_ID_PATTERN

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer sk-tw-…`")
_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


State = Annotated[GatewayState, Depends(gateway_state)]


def authenticated(state: State,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiKey:
    """The active API key of the request; 401 without one."""
    if creds is None:
        raise ApiError("unauthorized", "an API key is required: Authorization: Bearer <key>", _UNAUTHORIZED)
    key = state.keys.authenticate(creds.credentials)
    if key is None:
        raise ApiError("invalid_api_key", "this API key is not valid (unknown or revoked)", _UNAUTHORIZED)
    return key


def charge(state: GatewayState, key: ApiKey) -> ApiKey:
    """Count one request against the key's rate limit; 429 with ``Retry-After`` beyond it."""
    wait = state.keys.hit(key, state.gw.rate_limit_per_minute)
    if wait:
        raise ApiError("rate_limited", "too many requests for this API key", {"Retry-After": f"{wait:.0f}"})
    return key


def counted(state: State, key: Annotated[ApiKey, Depends(authenticated)]) -> ApiKey:
    """Submits and cancels count against the key's rate limit (so do reads that find no job)."""
    return charge(state, key)


#: The caller of a request that counts against the rate limit, and of one that does not.
Submitter = Annotated[ApiKey, Depends(counted)]
Reader = Annotated[ApiKey, Depends(authenticated)]
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, min_length=JOB_ID_MIN, max_length=JOB_ID_MAX,
                            examples=[EXAMPLE_JOB_ID])]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                              pattern=r"^[!-~]+$")]
