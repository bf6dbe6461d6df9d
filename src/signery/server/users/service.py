"""Users (administrators), their personal API tokens, and role bindings.

Acting on another user's credentials (creating, listing or revoking its API
tokens) needs, beyond ``user.manage`` (``user.read`` to list) at the user's home
TSG, every role the user holds covered by the caller (``Authorizer.decide_over``):
otherwise a superuser of a subtree could mint a token for a user homed there who
is auditor at the root, and read the root's audit trail with it. Likewise a role
is bound or unbound only by someone who covers it (``Authorizer.decide_binding``).
Refusals are audited as ``authz.escalation.refused``.

API tokens always expire, at most ``api_token_max_lifetime_days`` after they are
made; a request without a lifetime gets that maximum.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import (
    ApiTokenLifetimeTooLong,
    ApiTokenNotFound,
    InvalidRequest,
    NameTaken,
    PermissionDenied,
    PrivilegeEscalation,
    RoleBindingNotFound,
    TsgNotFound,
    UserNotFound,
)
from signery.protocol import AuditOutcome, PrincipalType, Role
from signery.server.access.authz import (
    Authorizer,
    Binding,
    Denied,
    Permission,
    Principal,
    uncovered,
)
from signery.server.access.context import RequestContext
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.persistence.db import Database, flush_unique, new_id
from signery.server.runtime.clock import Clock
from signery.server.tsg.models import TsgRow
from signery.server.tsg.tree import TsgDirectory
from signery.server.users.models import ApiTokenRow, RoleBindingRow, UserRow

API_TOKEN_PREFIX = "sgy_pat_"
API_TOKEN_ID_BYTES = 8
API_TOKEN_SECRET_BYTES = 32  # 256-bit secret
GENERATED_PASSWORD_BYTES = 18


def password_hasher() -> PasswordHasher:
    # argon2id with the RFC 9106 §4 "second recommended option" (64 MiB, t=3, p=4).
    return PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ParsedApiToken:
    token_id: str
    secret: str


def parse_api_token(token: str) -> ParsedApiToken | None:
    """``sgy_pat_<16 hex id>_<base64url secret>`` -> parts, or None if not that shape."""
    if not token.startswith(API_TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(API_TOKEN_PREFIX) :].partition("_")
    if not sep or len(token_id) != API_TOKEN_ID_BYTES * 2 or not secret or len(secret) > 128:
        return None
    try:
        int(token_id, 16)
    except ValueError:
        return None
    return ParsedApiToken(token_id, secret)


def user_to_wire(row: UserRow) -> p.User:
    return p.User(
        id=row.id,
        username=row.username,
        tsg_id=row.tsg_id,
        is_active=row.is_active,
        created_at=row.created_at,
    )


def token_to_wire(row: ApiTokenRow) -> p.ApiToken:
    return p.ApiToken(
        id=row.id,
        name=row.name,
        user_id=row.user_id,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked=row.revoked_at is not None,
    )


def binding_to_wire(row: RoleBindingRow) -> p.RoleBinding:
    return p.RoleBinding(
        id=row.id,
        principal_type=PrincipalType(row.principal_type),
        principal_id=row.principal_id,
        role=Role(row.role),
        tsg_id=row.tsg_id,
        created_at=row.created_at,
    )


class UserService:
    def __init__(
        self,
        *,
        db: Database,
        authz: Authorizer,
        recorder: AuditRecorder,
        clock: Clock,
        directory: TsgDirectory,
        hasher: PasswordHasher,
        max_token_lifetime_days: int,
    ) -> None:
        self._db = db
        self._authz = authz
        self._recorder = recorder
        self._clock = clock
        self._directory = directory
        self._hasher = hasher
        self.max_token_lifetime_days = max_token_lifetime_days

    def hash_password(self, password: str) -> str:
        return self._hasher.hash(password)

    # ------------------------------------------------------------ users

    def create_user(
        self, principal: Principal, req: p.UserCreate, ctx: RequestContext
    ) -> p.UserCreated:
        tsg_id = req.tsg_id or principal.tsg_id
        # Authorized before the argon2 hash (64 MiB, tens of ms): a caller without
        # user.manage there must not make the server pay for it. The hash is made
        # outside the write transaction, which checks again.
        with self._db.read() as s:
            path = self._directory.path(s, tsg_id)
        if path is None:
            raise TsgNotFound()
        self._authz.require(principal, Permission.USER_MANAGE, path, not_found=TsgNotFound)
        password = req.password or secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
        password_hash = self.hash_password(password)
        with self._db.write() as s:
            path = self._directory.path(s, tsg_id)
            if path is None:
                raise TsgNotFound()
            self._authz.require(principal, Permission.USER_MANAGE, path, not_found=TsgNotFound)
            if s.scalar(select(UserRow.id).where(UserRow.username == req.username)):
                raise NameTaken(f"username {req.username!r} is taken")
            row = self.insert_user(s, req.username, password_hash, tsg_id)
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.USER_CREATED,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=tsg_id,
                    tsg_path=path,
                    context=ctx,
                    details={"user_id": row.id, "username": row.username},
                ),
            )
        return p.UserCreated(
            **user_to_wire(row).model_dump(), password=None if req.password else password
        )

    def insert_user(
        self, s: Session, username: str, password_hash: str | None, tsg_id: str
    ) -> UserRow:
        row = UserRow(
            id=new_id(),
            username=username,
            password_hash=password_hash,
            tsg_id=tsg_id,
            is_active=True,
            created_at=self._clock.now(),
        )
        s.add(row)
        flush_unique(s, NameTaken(f"username {username!r} is taken"))
        return row

    def list_users(self, principal: Principal) -> list[p.User]:
        scopes = self._authz.scopes(principal, Permission.USER_READ)
        with self._db.read() as s:
            rows: list[UserRow] = []
            for scope in scopes:
                rows.extend(
                    s.scalars(
                        select(UserRow)
                        .join(TsgRow, TsgRow.id == UserRow.tsg_id)
                        .where(TsgRow.path.startswith(scope, autoescape=True))
                    )
                )
        return [user_to_wire(r) for r in sorted(rows, key=lambda r: r.username)]

    def _visible_user(
        self, principal: Principal, s: Session, user_ref: str, permission: Permission
    ) -> UserRow:
        row = s.get(UserRow, user_ref) or s.scalar(
            select(UserRow).where(UserRow.username == user_ref)
        )
        if row is None:
            raise UserNotFound()
        if row.id == principal.id and principal.type is PrincipalType.USER:
            return row
        self._authz.require(
            principal,
            permission,
            self._directory.require_path(s, row.tsg_id),
            not_found=UserNotFound,
        )
        return row

    def get_user(self, principal: Principal, user_ref: str) -> p.User:
        with self._db.read() as s:
            return user_to_wire(self._visible_user(principal, s, user_ref, Permission.USER_READ))

    # ------------------------------------------------------------ acting on another user

    def _require_over(
        self,
        s: Session,
        principal: Principal,
        user: UserRow,
        action: str,
        ctx: RequestContext,
        refused: list[AuditRecord],
    ) -> None:
        """Refuse (403, audited) unless ``principal`` covers every role ``user`` holds.
        The caller already sees the user (else it was not found). Oneself: always."""
        if user.id == principal.id and principal.type is PrincipalType.USER:
            return
        target = load_user_principal(s, user, self._directory)
        decision = self._authz.decide_over(principal, target.bindings)
        if not isinstance(decision, Denied):
            return
        roles = sorted({b.role.value for b in uncovered(principal, target.bindings)})
        refused.append(
            AuditRecord(
                EventKind.ESCALATION_REFUSED,
                AuditOutcome.DENIED,
                Actor.of(principal),
                reason=decision.reason,
                tsg_id=user.tsg_id,
                tsg_path=target.tsg_path,
                context=ctx,
                # The roles, not where they are bound: the caller's own auditors read
                # this event, and TSGs beyond their reach must not show in it.
                details={"action": action, "user_id": user.id, "uncovered_roles": roles},
            )
        )
        # The detail does not say where: those TSGs may be invisible to the caller.
        raise PrivilegeEscalation(
            f"user {user.username!r} holds roles beyond yours ({', '.join(roles)}); only "
            "an administrator who holds them may act on its credentials"
        )

    # ------------------------------------------------------------ API tokens

    def _token_lifetime(self, req: p.ApiTokenCreate) -> int:
        """Days a requested token lives: the maximum when none is asked for. An
        explicit ``null`` asked for a token that never expires: refused."""
        maximum = self.max_token_lifetime_days
        if req.expires_in_days is None and "expires_in_days" in req.model_fields_set:
            raise ApiTokenLifetimeTooLong(
                f"API tokens always expire: give expires_in_days (1 to {maximum}), or omit "
                f"it for {maximum} days",
                max_days=maximum,
            )
        days = maximum if req.expires_in_days is None else req.expires_in_days
        if days > maximum:
            raise ApiTokenLifetimeTooLong(
                f"API tokens live at most {maximum} days on this server", max_days=maximum
            )
        return days

    def create_token(
        self, principal: Principal, user_ref: str | None, req: p.ApiTokenCreate, ctx: RequestContext
    ) -> p.ApiTokenCreated:
        """Create a personal API token: for oneself, or for another user with
        user.manage at its home TSG and every one of its roles covered."""
        if principal.type is not PrincipalType.USER:
            raise PermissionDenied("only users have API tokens")
        days = self._token_lifetime(req)
        with self._recorder.refusals() as refused, self._db.write() as s:
            user = self._visible_user(
                principal, s, user_ref or principal.id, Permission.USER_MANAGE
            )
            self._require_over(s, principal, user, "user.api_token.create", ctx, refused)
            token, row = self.insert_token(s, user.id, req.name, days)
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.API_TOKEN_CREATED,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=user.tsg_id,
                    tsg_path=self._directory.path(s, user.tsg_id),
                    context=ctx,
                    details={
                        "token_id": row.id,
                        "user_id": user.id,
                        "name": req.name,
                        "expires_in_days": days,
                    },
                ),
            )
        return p.ApiTokenCreated(**token_to_wire(row).model_dump(), token=token)

    def insert_token(
        self, s: Session, user_id: str, name: str, expires_in_days: int
    ) -> tuple[str, ApiTokenRow]:
        token_id = secrets.token_hex(API_TOKEN_ID_BYTES)
        secret = secrets.token_urlsafe(API_TOKEN_SECRET_BYTES)
        now = self._clock.now()
        row = ApiTokenRow(
            id=token_id,
            user_id=user_id,
            name=name,
            secret_hash=hash_secret(secret),
            created_at=now,
            expires_at=now + timedelta(days=expires_in_days),
            last_used_at=None,
            revoked_at=None,
        )
        s.add(row)
        s.flush()
        return f"{API_TOKEN_PREFIX}{token_id}_{secret}", row

    def list_tokens(
        self, principal: Principal, user_ref: str | None, ctx: RequestContext
    ) -> list[p.ApiToken]:
        if user_ref is None and principal.type is not PrincipalType.USER:
            raise PermissionDenied("only users have API tokens")
        with self._recorder.refusals() as refused, self._db.read() as s:
            user = self._visible_user(principal, s, user_ref or principal.id, Permission.USER_READ)
            self._require_over(s, principal, user, "user.api_token.list", ctx, refused)
            rows = s.scalars(select(ApiTokenRow).where(ApiTokenRow.user_id == user.id))
            return [token_to_wire(r) for r in sorted(rows, key=lambda r: r.created_at)]

    def revoke_token(self, principal: Principal, token_id: str, ctx: RequestContext) -> p.ApiToken:
        with self._recorder.refusals() as refused, self._db.write() as s:
            row = s.get(ApiTokenRow, token_id)
            if row is None:
                raise ApiTokenNotFound()
            user = s.get(UserRow, row.user_id)
            assert user is not None
            if user.id != principal.id:
                self._authz.require(
                    principal,
                    Permission.USER_MANAGE,
                    self._directory.require_path(s, user.tsg_id),
                    not_found=ApiTokenNotFound,
                )
                self._require_over(s, principal, user, "user.api_token.revoke", ctx, refused)
            if row.revoked_at is None:
                row.revoked_at = self._clock.now()
                self._recorder.record(
                    s,
                    AuditRecord(
                        EventKind.API_TOKEN_REVOKED,
                        AuditOutcome.SUCCEEDED,
                        Actor.of(principal),
                        tsg_id=user.tsg_id,
                        tsg_path=self._directory.path(s, user.tsg_id),
                        context=ctx,
                        details={"token_id": row.id, "user_id": user.id},
                    ),
                )
            return token_to_wire(row)

    # ------------------------------------------------------------ role bindings

    def _require_binding(
        self,
        principal: Principal,
        role: Role,
        tsg_id: str,
        path: str,
        user_id: str,
        action: str,
        ctx: RequestContext,
        refused: list[AuditRecord],
    ) -> None:
        """Refuse (403, audited) to grant or remove a role the caller does not cover.
        (Today only superusers manage bindings, and they cover every role in their
        subtree; this holds the rule if a narrower role ever may.)"""
        decision = self._authz.decide_binding(principal, role, path)
        if not isinstance(decision, Denied):
            return
        refused.append(
            AuditRecord(
                EventKind.ESCALATION_REFUSED,
                AuditOutcome.DENIED,
                Actor.of(principal),
                reason=decision.reason,
                tsg_id=tsg_id,
                tsg_path=path,
                context=ctx,
                details={"action": action, "user_id": user_id, "role": role.value},
            )
        )
        raise PrivilegeEscalation(f"you do not hold every permission of {role.value} here")

    def bind_role(
        self, principal: Principal, req: p.RoleBindingCreate, ctx: RequestContext
    ) -> p.RoleBinding:
        if req.principal_type is not PrincipalType.USER:
            raise InvalidRequest(
                "roles are bound to users; built-in accounts sign with keys of their TSG"
            )
        with self._recorder.refusals() as refused, self._db.write() as s:
            path = self._directory.path(s, req.tsg_id)
            if path is None:
                raise TsgNotFound()
            self._authz.require(
                principal, Permission.ROLE_BINDING_MANAGE, path, not_found=TsgNotFound
            )
            user = self._visible_user(principal, s, req.principal_id, Permission.USER_READ)
            self._require_binding(
                principal, req.role, req.tsg_id, path, user.id, "role.bind", ctx, refused
            )
            existing = s.scalar(
                select(RoleBindingRow).where(
                    RoleBindingRow.principal_type == req.principal_type.value,
                    RoleBindingRow.principal_id == user.id,
                    RoleBindingRow.role == req.role.value,
                    RoleBindingRow.tsg_id == req.tsg_id,
                )
            )
            if existing is not None:
                return binding_to_wire(existing)
            row = self.insert_binding(s, user.id, req.role, req.tsg_id)
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.ROLE_BOUND,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=req.tsg_id,
                    tsg_path=path,
                    context=ctx,
                    details={"binding_id": row.id, "user_id": user.id, "role": req.role.value},
                ),
            )
            return binding_to_wire(row)

    def insert_binding(self, s: Session, user_id: str, role: Role, tsg_id: str) -> RoleBindingRow:
        row = RoleBindingRow(
            id=new_id(),
            principal_type=PrincipalType.USER.value,
            principal_id=user_id,
            role=role.value,
            tsg_id=tsg_id,
            created_at=self._clock.now(),
        )
        s.add(row)
        flush_unique(s, NameTaken("this role binding already exists"))
        return row

    def unbind_role(self, principal: Principal, binding_id: str, ctx: RequestContext) -> None:
        """Remove a binding: ``role_binding.manage`` where it is bound, and the role
        covered, as for granting it. The bound user's other roles do not matter:
        removing a role at a TSG one governs takes nothing beyond it."""
        with self._recorder.refusals() as refused, self._db.write() as s:
            row = s.get(RoleBindingRow, binding_id)
            if row is None:
                raise RoleBindingNotFound()
            path = self._directory.require_path(s, row.tsg_id)
            self._authz.require(
                principal, Permission.ROLE_BINDING_MANAGE, path, not_found=RoleBindingNotFound
            )
            self._require_binding(
                principal,
                Role(row.role),
                row.tsg_id,
                path,
                row.principal_id,
                "role.unbind",
                ctx,
                refused,
            )
            s.delete(row)
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.ROLE_UNBOUND,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=row.tsg_id,
                    tsg_path=path,
                    context=ctx,
                    details={"binding_id": row.id, "user_id": row.principal_id, "role": row.role},
                ),
            )

    def list_bindings(self, principal: Principal, tsg_id: str | None = None) -> list[p.RoleBinding]:
        scopes = self._authz.scopes(principal, Permission.ROLE_BINDING_READ)
        with self._db.read() as s:
            rows: list[RoleBindingRow] = []
            for scope in scopes:
                q = (
                    select(RoleBindingRow)
                    .join(TsgRow, TsgRow.id == RoleBindingRow.tsg_id)
                    .where(TsgRow.path.startswith(scope, autoescape=True))
                )
                if tsg_id:
                    q = q.where(RoleBindingRow.tsg_id == tsg_id)
                rows.extend(s.scalars(q))
        return [binding_to_wire(r) for r in sorted(rows, key=lambda r: r.created_at)]

    # ------------------------------------------------------------ authentication support

    def verify_password(self, username: str, password: str) -> UserRow | None:
        """The active user whose password this is, or None. Runs a full argon2
        verification even for unknown users, so timing does not reveal usernames."""
        with self._db.read() as s:
            row = s.scalar(select(UserRow).where(UserRow.username == username))
        real = row is not None and row.password_hash is not None
        stored = row.password_hash if row is not None and row.password_hash else _dummy_hash()
        try:
            self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None or not real or not row.is_active:
            return None
        return row


def load_user_principal(s: Session, user: UserRow, directory: TsgDirectory) -> Principal:
    """A user's principal with every role binding resolved to its TSG path."""
    from sqlalchemy.orm import Session

    assert isinstance(s, Session)
    rows = s.execute(
        select(RoleBindingRow.role, RoleBindingRow.tsg_id, TsgRow.path)
        .join(TsgRow, TsgRow.id == RoleBindingRow.tsg_id)
        .where(
            RoleBindingRow.principal_type == PrincipalType.USER.value,
            RoleBindingRow.principal_id == user.id,
        )
    ).all()
    bindings = tuple(Binding(Role(r.role), r.tsg_id, r.path) for r in rows)
    return Principal(
        type=PrincipalType.USER,
        id=user.id,
        name=user.username,
        tsg_id=user.tsg_id,
        tsg_path=directory.require_path(s, user.tsg_id),
        bindings=bindings,
    )


def token_matches(row: ApiTokenRow, secret: str, now: datetime) -> bool:
    # Constant-time comparison of the hashes: no timing oracle on the secret.
    ok = hmac.compare_digest(row.secret_hash, hash_secret(secret))
    return ok and row.revoked_at is None and row.expires_at > now


@functools.cache
def _dummy_hash() -> str:
    return password_hasher().hash(secrets.token_urlsafe(16))
