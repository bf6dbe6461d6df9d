"""Authentication: who is calling. Turns credentials into a :class:`Principal`.

* ``Bearer sgy_pat_...``: a user's personal API token (management plane);
* ``Bearer <JWT>``: an account's access token from the token endpoint;
* ``Basic``: username and password, accepted only where a route asks for it
  (creating an API token, EST), never as a general credential, and only within
  the sign-in limits (signery.server.limits): failures counted per username and
  per source across replicas, and a bounded number of verifications at once.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import timedelta

import anyio.to_thread
from sqlalchemy import select, update

from signery.errors import (
    AccountDisabled,
    AccountExpired,
    AuthenticationFailed,
    InvalidCredentials,
    InvalidToken,
)
from signery.protocol import AccountStatus, PrincipalType, has_control_characters
from signery.server.access.authz import Principal
from signery.server.access.claims import AccessClaims
from signery.server.access.context import RequestContext
from signery.server.accounts.models import AccountRow
from signery.server.accounts.tokens import STALE_TOKEN, AccessTokenCodec
from signery.server.limits.service import AuthLimits
from signery.server.persistence.db import Database
from signery.server.runtime.clock import Clock
from signery.server.tsg.tree import TsgDirectory
from signery.server.users.models import ApiTokenRow, UserRow
from signery.server.users.service import (
    UserService,
    load_user_principal,
    parse_api_token,
    token_matches,
)

LAST_USED_RESOLUTION = timedelta(minutes=1)
MAX_CREDENTIAL_CHARS = 8192


@dataclass(frozen=True, slots=True)
class Credentials:
    scheme: str  # "bearer" | "basic"
    value: str


def parse_authorization(header: str | None) -> Credentials:
    if not header:
        raise AuthenticationFailed("an Authorization header is required")
    if len(header) > MAX_CREDENTIAL_CHARS:
        raise InvalidToken()
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme not in ("bearer", "basic") or not value:
        raise AuthenticationFailed("use Authorization: Bearer <token>")
    return Credentials(scheme, value)


def parse_basic(value: str) -> tuple[str, str]:
    """(username, password) from the value of ``Authorization: Basic`` (RFC 7617)."""
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise AuthenticationFailed("malformed Basic credentials") from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise AuthenticationFailed("malformed Basic credentials")
    return username, password


class Authenticator:
    def __init__(
        self,
        *,
        db: Database,
        directory: TsgDirectory,
        codec: AccessTokenCodec,
        clock: Clock,
        users: UserService,
        limits: AuthLimits,
    ) -> None:
        self._db = db
        self._directory = directory
        self._codec = codec
        self._clock = clock
        self._users = users
        self._limits = limits

    def access_claims(self, header: str | None) -> AccessClaims:
        """Verify an account's access token (CPU only; the account row is checked by
        the signing service in the same database read as the key)."""
        creds = parse_authorization(header)
        if creds.scheme != "bearer" or creds.value.startswith("sgy_"):
            raise InvalidToken("the signing plane takes an access token from /api/v1/oauth/token")
        return self._codec.verify(creds.value)

    async def principal_async(
        self, header: str | None, ctx: RequestContext, *, allow_password: bool = False
    ) -> Principal:
        """Resolve any credential to a principal; a password (where the route takes
        one) only within the sign-in limits."""
        creds = parse_authorization(header)
        if creds.scheme == "basic" and allow_password:
            return await self._password(creds.value, ctx)
        return await anyio.to_thread.run_sync(self.principal, header)

    def principal(self, header: str | None) -> Principal:
        """Resolve a bearer credential to a principal, checking it against the database
        (blocking: call it from a worker thread)."""
        creds = parse_authorization(header)
        if creds.scheme == "basic":
            raise AuthenticationFailed("passwords are accepted only to create an API token")
        parsed = parse_api_token(creds.value)
        if parsed is not None:
            return self._api_token(parsed.token_id, parsed.secret)
        if creds.value.startswith("sgy_"):
            raise InvalidToken()
        return self._account(self._codec.verify(creds.value))

    def _api_token(self, token_id: str, secret: str) -> Principal:
        now = self._clock.now()
        with self._db.read() as s:
            row = s.get(ApiTokenRow, token_id)
            if row is None or not token_matches(row, secret, now):
                raise InvalidToken()
            user = s.get(UserRow, row.user_id)
            if user is None or not user.is_active:
                raise InvalidToken()
            principal = load_user_principal(s, user, self._directory)
            stale = row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION
        if stale:
            # Bounded write rate: last_used_at is kept to the minute.
            with self._db.write() as s:
                s.execute(
                    update(ApiTokenRow).where(ApiTokenRow.id == token_id).values(last_used_at=now)
                )
        return principal

    async def _password(self, value: str, ctx: RequestContext) -> Principal:
        username, password = parse_basic(value)
        if has_control_characters(username):
            # No user has such a name (nor could: PostgreSQL cannot even look up
            # a NUL); answered as any unknown username is, before any cost.
            raise InvalidCredentials()
        async with self._limits.sign_in(username, ctx) as attempt:
            user = await anyio.to_thread.run_sync(self._users.verify_password, username, password)
            if user is None:
                attempt.failed()
                raise InvalidCredentials()
        return await anyio.to_thread.run_sync(self._user_principal, user)

    def _user_principal(self, user: UserRow) -> Principal:
        with self._db.read() as s:
            return load_user_principal(s, user, self._directory)

    def _account(self, claims: AccessClaims) -> Principal:
        with self._db.read() as s:
            row = s.scalar(select(AccountRow).where(AccountRow.id == claims.account_id))
            if row is None or row.client_id != claims.client_id:
                raise InvalidToken()
            if row.status == AccountStatus.DISABLED.value:
                raise AccountDisabled()
            if row.token_epoch != claims.epoch:
                raise InvalidToken(STALE_TOKEN)
            if row.valid_until <= self._clock.now():
                raise AccountExpired()
            return Principal(
                type=PrincipalType.ACCOUNT,
                id=row.id,
                name=row.name,
                tsg_id=row.tsg_id,
                tsg_path=self._directory.require_path(s, row.tsg_id),
            )
