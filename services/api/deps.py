"""Request dependencies as Annotated aliases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Request

from lorafleet.platform.auth import Principal, authenticate
from lorafleet.platform.domain.enums import Scope
from lorafleet.services.api.state import ApiState


def get_state(request: Request) -> ApiState:
    return request.app.state.api  # type: ignore[no-any-return]


StateDep = Annotated[ApiState, Depends(get_state)]


def get_principal(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> Principal:
    with state.sessions() as session:
        return authenticate(session, authorization)


def require(scope: Scope) -> Callable[[Principal], Principal]:
    def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        principal.require(scope)
        return principal

    return check


ReadPrincipal = Annotated[Principal, Depends(require(Scope.READ))]
TrainPrincipal = Annotated[Principal, Depends(require(Scope.TRAIN))]
InferPrincipal = Annotated[Principal, Depends(require(Scope.INFER))]
AdminPrincipal = Annotated[Principal, Depends(require(Scope.ADMIN))]
