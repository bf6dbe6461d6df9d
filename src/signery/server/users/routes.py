"""HTTP routes for users, API tokens and role bindings."""

from __future__ import annotations

from fastapi import APIRouter, Response

from signery import protocol as p
from signery.protocol import API_PREFIX
from signery.server.http.deps import ContextDep, PasswordPrincipalDep, PrincipalDep, ServicesDep

router = APIRouter(prefix=API_PREFIX, tags=["users"])


@router.post("/users", status_code=201, response_model=p.UserCreated)
def create_user(
    body: p.UserCreate, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.UserCreated:
    return services.users.create_user(principal, body, ctx)


@router.get("/users", response_model=list[p.User])
def list_users(principal: PrincipalDep, services: ServicesDep) -> list[p.User]:
    return services.users.list_users(principal)


@router.get("/users/me", response_model=p.User)
def whoami(principal: PrincipalDep, services: ServicesDep) -> p.User:
    return services.users.get_user(principal, principal.id)


@router.post("/users/me/tokens", status_code=201, response_model=p.ApiTokenCreated)
def create_own_token(
    body: p.ApiTokenCreate, principal: PasswordPrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.ApiTokenCreated:
    """Create a personal API token. Accepts HTTP Basic (username:password) or a token."""
    return services.users.create_token(principal, None, body, ctx)


@router.get("/users/me/tokens", response_model=list[p.ApiToken])
def list_own_tokens(
    principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> list[p.ApiToken]:
    return services.users.list_tokens(principal, None, ctx)


@router.get("/users/{user}", response_model=p.User)
def get_user(user: str, principal: PrincipalDep, services: ServicesDep) -> p.User:
    return services.users.get_user(principal, user)


@router.post("/users/{user}/tokens", status_code=201, response_model=p.ApiTokenCreated)
def create_token(
    user: str,
    body: p.ApiTokenCreate,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
) -> p.ApiTokenCreated:
    return services.users.create_token(principal, user, body, ctx)


@router.get("/users/{user}/tokens", response_model=list[p.ApiToken])
def list_tokens(
    user: str, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> list[p.ApiToken]:
    return services.users.list_tokens(principal, user, ctx)


@router.delete("/tokens/{token_id}", response_model=p.ApiToken)
def revoke_token(
    token_id: str, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.ApiToken:
    return services.users.revoke_token(principal, token_id, ctx)


@router.post("/role-bindings", status_code=201, response_model=p.RoleBinding)
def bind_role(
    body: p.RoleBindingCreate, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.RoleBinding:
    return services.users.bind_role(principal, body, ctx)


@router.get("/role-bindings", response_model=list[p.RoleBinding])
def list_bindings(
    principal: PrincipalDep, services: ServicesDep, tsg_id: str | None = None
) -> list[p.RoleBinding]:
    return services.users.list_bindings(principal, tsg_id)


@router.delete("/role-bindings/{binding_id}", status_code=204)
def unbind_role(
    binding_id: str, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> Response:
    services.users.unbind_role(principal, binding_id, ctx)
    return Response(status_code=204)
