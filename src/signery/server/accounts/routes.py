"""HTTP routes for built-in accounts and the OAuth token endpoint."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from signery import protocol as p
from signery.protocol import API_PREFIX
from signery.server.http.deps import ContextDep, PrincipalDep, ServicesDep

router = APIRouter(prefix=API_PREFIX, tags=["accounts"])


@router.post("/accounts", status_code=201, response_model=p.AccountCreated)
def create_account(
    body: p.AccountCreate, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.AccountCreated:
    return services.accounts.create(principal, body, ctx)


@router.get("/accounts", response_model=list[p.Account])
def list_accounts(
    principal: PrincipalDep, services: ServicesDep, tsg_id: str | None = None
) -> list[p.Account]:
    return services.accounts.list_accounts(principal, tsg_id)


@router.get("/accounts/{account}", response_model=p.Account)
def get_account(account: str, principal: PrincipalDep, services: ServicesDep) -> p.Account:
    return services.accounts.get(principal, account)


@router.post("/accounts/{account}/disable", response_model=p.Account)
def disable_account(
    account: str, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.Account:
    return services.accounts.set_enabled(principal, account, False, ctx)


@router.post("/accounts/{account}/enable", response_model=p.Account)
def enable_account(
    account: str, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.Account:
    return services.accounts.set_enabled(principal, account, True, ctx)


@router.post("/accounts/{account}/keys", status_code=201, response_model=p.Account)
def add_account_key(
    account: str,
    body: p.AccountKeyAdd,
    principal: PrincipalDep,
    services: ServicesDep,
    ctx: ContextDep,
) -> p.Account:
    return services.accounts.add_key(principal, account, body, ctx)


@router.delete("/accounts/{account}/keys/{key_id}", response_model=p.Account)
def remove_account_key(
    account: str, key_id: str, principal: PrincipalDep, services: ServicesDep, ctx: ContextDep
) -> p.Account:
    """Remove a public key; the account's access tokens issued before end too."""
    return services.accounts.remove_key(principal, account, key_id, ctx)


@router.post(
    "/oauth/token",
    response_model=p.TokenResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "required": ["grant_type", "assertion"],
                        "properties": {
                            "grant_type": {"type": "string", "enum": [p.JWT_BEARER_GRANT]},
                            "assertion": {"type": "string", "description": "RFC 7523 JWT"},
                        },
                    }
                }
            },
        }
    },
)
async def token(request: Request, services: ServicesDep, ctx: ContextDep) -> JSONResponse:
    """RFC 7523 JWT-bearer grant: exchange a signed assertion for an access token."""
    body = await request.body()
    result = await anyio.to_thread.run_sync(
        services.tokens.exchange, body, request.headers.get("content-type"), ctx
    )
    # RFC 6749 §5.1: token responses must not be cached.
    return JSONResponse(
        result.model_dump(), headers={"Cache-Control": "no-store", "Pragma": "no-cache"}
    )
