"""Built-in accounts: the machine identities that sign.

An account's public keys are its credentials: whoever registers a key can sign
as the account. An account admin may add one, except to an account that a
signing key's policy names as a signer, which also needs ``signing_key.manage``
on those keys (``Authorizer.decide_account_key``); otherwise an account admin
could make itself the only signer a key administrator chose. A key can be
removed (never the last one). Removing a key, and disabling the account, move
the account's token epoch on, which ends every access token issued before.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.crypto import public_key_fingerprint, public_key_pem
from signery.errors import (
    AccountKeyNotFound,
    AccountNotFound,
    InvalidPublicKey,
    InvalidRequest,
    LastAccountKey,
    NameTaken,
    SignerKeyAdminRequired,
    TsgNotFound,
)
from signery.ids import AccountId, KeyId
from signery.protocol import AccountStatus, AuditOutcome
from signery.server.access.authz import Authorizer, Denied, Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.accounts.models import AccountKeyRow, AccountRow
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.persistence.db import Database, flush_unique, new_id
from signery.server.runtime.clock import Clock
from signery.server.tsg.models import TsgRow
from signery.server.tsg.tree import TsgDirectory

AccountPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
MAX_KEYS_PER_ACCOUNT = 8
_CURVE_NAMES = {"secp256r1": "EC_P256", "secp384r1": "EC_P384", "secp521r1": "EC_P521"}
GENERATED_ALGORITHMS = ("EC_P256", "EC_P384", "RSA_3072", "ED25519")


def account_key_algorithm(key: object) -> str:
    """Classify an account public key, refusing weak or unsupported ones."""
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise InvalidPublicKey(f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")
        # Small public exponents invite well-known attacks on broken padding checks.
        if key.public_numbers().e < 65537:
            raise InvalidPublicKey("RSA public exponent must be at least 65537")
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        try:
            return _CURVE_NAMES[key.curve.name]
        except KeyError:
            raise InvalidPublicKey(
                f"curve {key.curve.name} is not accepted; use P-256, P-384 or P-521"
            ) from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ED25519"
    raise InvalidPublicKey(f"{type(key).__name__} keys are not accepted")


def parse_account_public_key(pem: str) -> tuple[AccountPublicKey, str]:
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise InvalidPublicKey("public_key_pem is not a PEM SubjectPublicKeyInfo") from e
    algorithm = account_key_algorithm(key)
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    return key, algorithm


def generate_account_key(algorithm: str) -> tuple[str, AccountPublicKey]:
    """A fresh key pair for an account: (PKCS#8 PEM of the private key, public key).

    The private half is returned to the caller once and is never stored.
    """
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "EC_P256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "EC_P384":
        private = ec.generate_private_key(ec.SECP384R1())
    elif algorithm == "RSA_3072":
        private = rsa.generate_private_key(65537, 3072)
    elif algorithm == "ED25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise InvalidRequest(f"key_algorithm must be one of {', '.join(GENERATED_ALGORITHMS)}")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    return pem, private.public_key()


def key_to_wire(row: AccountKeyRow) -> p.AccountKey:
    key = serialization.load_der_public_key(row.public_key_der)
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    return p.AccountKey(
        id=row.id,
        algorithm=row.algorithm,
        fingerprint=row.fingerprint,
        public_key_pem=public_key_pem(key),
        created_at=row.created_at,
    )


class SignerKeys(Protocol):
    """The keys whose policy names an account as a signer, each as (key id, key
    TSG path). Key policies answer it
    (``signery.server.keys.policy_reads.keys_naming_signer``); it is handed in,
    so that accounts know nothing of keys (keys name accounts, not the reverse)."""

    def __call__(self, s: Session, account_id: AccountId, /) -> list[tuple[KeyId, str]]: ...


class AccountService:
    def __init__(
        self,
        *,
        db: Database,
        authz: Authorizer,
        recorder: AuditRecorder,
        clock: Clock,
        directory: TsgDirectory,
        signer_keys: SignerKeys,
    ) -> None:
        self._db = db
        self._authz = authz
        self._recorder = recorder
        self._clock = clock
        self._directory = directory
        self._signer_keys = signer_keys

    def _status(self, row: AccountRow) -> AccountStatus:
        if row.status == AccountStatus.DISABLED.value:
            return AccountStatus.DISABLED
        if row.valid_until <= self._clock.now():
            return AccountStatus.EXPIRED
        return AccountStatus.ACTIVE

    def _wire(self, s: Session, row: AccountRow) -> p.Account:
        keys = s.scalars(
            select(AccountKeyRow)
            .where(AccountKeyRow.account_id == row.id)
            .order_by(AccountKeyRow.created_at)
        )
        return p.Account(
            id=row.id,
            client_id=row.client_id,
            name=row.name,
            tsg_id=row.tsg_id,
            status=self._status(row),
            valid_until=row.valid_until,
            created_at=row.created_at,
            keys=[key_to_wire(k) for k in keys],
        )

    def create(
        self, principal: Principal, req: p.AccountCreate, ctx: RequestContext
    ) -> p.AccountCreated:
        tsg_id = req.tsg_id or principal.tsg_id
        private_pem: str | None = None
        if req.public_key_pem is not None:
            public_key, key_algorithm = parse_account_public_key(req.public_key_pem)
        else:
            private_pem, public_key = generate_account_key(req.key_algorithm)
            key_algorithm = account_key_algorithm(public_key)
        now = self._clock.now()
        with self._db.write() as s:
            path = self._directory.path(s, tsg_id)
            if path is None:
                raise TsgNotFound()
            self._authz.require(principal, Permission.ACCOUNT_MANAGE, path, not_found=TsgNotFound)
            if s.scalar(
                select(AccountRow.id).where(
                    AccountRow.tsg_id == tsg_id, AccountRow.name == req.name
                )
            ):
                raise NameTaken(f"an account named {req.name!r} already exists in TSG {tsg_id}")
            row = AccountRow(
                id=new_id(),
                client_id=str(uuid.uuid4()),
                name=req.name,
                tsg_id=tsg_id,
                status=AccountStatus.ACTIVE.value,
                valid_until=now + timedelta(days=req.validity_days),
                created_at=now,
                updated_at=now,
            )
            s.add(row)
            flush_unique(
                s, NameTaken(f"an account named {req.name!r} already exists in TSG {tsg_id}")
            )
            self._add_key(s, row, public_key, key_algorithm)
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.ACCOUNT_CREATED,
                    AuditOutcome.SUCCEEDED,
                    Actor.of(principal),
                    tsg_id=tsg_id,
                    tsg_path=path,
                    context=ctx,
                    details={
                        "account_id": row.id,
                        "client_id": row.client_id,
                        "name": row.name,
                        "key_origin": "uploaded" if private_pem is None else "generated",
                        "key_fingerprint": public_key_fingerprint(public_key),
                        "validity_days": req.validity_days,
                    },
                ),
            )
            wire = self._wire(s, row)
        return p.AccountCreated(**wire.model_dump(), private_key_pem=private_pem)

    def _add_key(
        self, s: Session, account: AccountRow, key: AccountPublicKey, algorithm: str
    ) -> AccountKeyRow:
        row = AccountKeyRow(
            id=new_id(),
            account_id=account.id,
            algorithm=algorithm,
            public_key_der=key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            fingerprint=public_key_fingerprint(key),
            created_at=self._clock.now(),
        )
        s.add(row)
        flush_unique(s, NameTaken("this public key is already registered for the account"))
        return row

    def _visible(
        self,
        s: Session,
        principal: Principal,
        ref: str,
        permission: Permission,
        *,
        lock: bool = False,
    ) -> tuple[AccountRow, str]:
        """The account by id or client id, if ``principal`` has ``permission`` on it.
        ``lock``: held until the transaction ends (changes to its set of keys)."""
        q = select(AccountRow).where((AccountRow.id == ref) | (AccountRow.client_id == ref))
        row = s.scalar(q.with_for_update() if lock else q)
        if row is None:
            raise AccountNotFound()
        path = self._directory.require_path(s, row.tsg_id)
        self._authz.require(principal, permission, path, not_found=AccountNotFound)
        return row, path

    def get(self, principal: Principal, ref: str) -> p.Account:
        with self._db.read() as s:
            row, _ = self._visible(s, principal, ref, Permission.ACCOUNT_READ)
            return self._wire(s, row)

    def list_accounts(self, principal: Principal, tsg_id: str | None = None) -> list[p.Account]:
        scopes = self._authz.scopes(principal, Permission.ACCOUNT_READ)
        with self._db.read() as s:
            out: list[p.Account] = []
            for scope in scopes:
                q = (
                    select(AccountRow)
                    .join(TsgRow, TsgRow.id == AccountRow.tsg_id)
                    .where(TsgRow.path.startswith(scope, autoescape=True))
                )
                if tsg_id:
                    q = q.where(AccountRow.tsg_id == tsg_id)
                out.extend(self._wire(s, r) for r in s.scalars(q))
        return sorted(out, key=lambda a: (a.tsg_id, a.name))

    def set_enabled(
        self, principal: Principal, ref: str, enabled: bool, ctx: RequestContext
    ) -> p.Account:
        """Disable or enable an account. Takes effect on the very next request of any
        replica: every bearer token is checked against the account row. Disabling
        also ends every access token issued so far, so enabling revives none."""
        with self._db.write() as s:
            row, path = self._visible(s, principal, ref, Permission.ACCOUNT_MANAGE)
            target = AccountStatus.ACTIVE if enabled else AccountStatus.DISABLED
            if row.status != target.value:
                row.status = target.value
                row.updated_at = self._clock.now()
                if not enabled:
                    self._end_access_tokens(s, row)
                self._recorder.record(
                    s,
                    AuditRecord(
                        EventKind.ACCOUNT_ENABLED if enabled else EventKind.ACCOUNT_DISABLED,
                        AuditOutcome.SUCCEEDED,
                        Actor.of(principal),
                        tsg_id=row.tsg_id,
                        tsg_path=path,
                        context=ctx,
                        details={"account_id": row.id, "client_id": row.client_id},
                    ),
                )
            s.flush()
            return self._wire(s, row)

    def _end_access_tokens(self, s: Session, row: AccountRow) -> None:
        # In SQL, not from the loaded value: two changes at once both move it on.
        s.execute(
            update(AccountRow)
            .where(AccountRow.id == row.id)
            .values(token_epoch=AccountRow.token_epoch + 1)
        )

    def _key_count(self, s: Session, account: AccountRow) -> int:
        return int(
            s.scalar(
                select(func.count())
                .select_from(AccountKeyRow)
                .where(AccountKeyRow.account_id == account.id)
            )
            or 0
        )

    def add_key(
        self, principal: Principal, ref: str, req: p.AccountKeyAdd, ctx: RequestContext
    ) -> p.Account:
        """Register another public key (account.manage; on an account a key's policy
        names as a signer, signing_key.manage on those keys as well)."""
        key, algorithm = parse_account_public_key(req.public_key_pem)
        with self._recorder.refusals() as refused, self._db.write() as s:
            row, path = self._visible(s, principal, ref, Permission.ACCOUNT_MANAGE, lock=True)
            named = self._signer_keys(s, AccountId(row.id))
            decision = self._authz.decide_account_key(
                principal, [key_path for _, key_path in named]
            )
            if isinstance(decision, Denied):
                refused.append(
                    AuditRecord(
                        EventKind.ESCALATION_REFUSED,
                        AuditOutcome.DENIED,
                        Actor.of(principal),
                        reason=decision.reason,
                        tsg_id=row.tsg_id,
                        tsg_path=path,
                        context=ctx,
                        details={
                            "action": "account.key.add",
                            "account_id": row.id,
                            "signer_of_keys": [k for k, _ in named],
                        },
                    )
                )
                raise SignerKeyAdminRequired(
                    f"{len(named)} signing key(s) name this account as a signer: adding a key "
                    "to it needs key_admin on each of them"
                )
            if self._key_count(s, row) >= MAX_KEYS_PER_ACCOUNT:
                raise InvalidRequest(f"an account holds at most {MAX_KEYS_PER_ACCOUNT} keys")
            added = self._add_key(s, row, key, algorithm)
            self._key_event(s, EventKind.ACCOUNT_KEY_ADDED, principal, row, path, added, ctx)
            return self._wire(s, row)

    def _key_event(
        self,
        s: Session,
        kind: EventKind,
        principal: Principal,
        row: AccountRow,
        path: str,
        key: AccountKeyRow,
        ctx: RequestContext,
    ) -> None:
        """A key added to or removed from an account: who did it, which key."""
        self._recorder.record(
            s,
            AuditRecord(
                kind,
                AuditOutcome.SUCCEEDED,
                Actor.of(principal),
                tsg_id=row.tsg_id,
                tsg_path=path,
                context=ctx,
                details={
                    "account_id": row.id,
                    "key_id": key.id,
                    "key_fingerprint": key.fingerprint,
                },
            ),
        )

    def remove_key(
        self, principal: Principal, ref: str, key_id: str, ctx: RequestContext
    ) -> p.Account:
        """Remove one of the account's public keys (account.manage). Assertions signed
        with it are refused from now on, and every access token of the account
        issued before ends (tokens do not say which key minted them); holders of
        the remaining keys get new ones. The last key stays: an account without
        keys is one nobody can use, which is what disabling it says."""
        with self._db.write() as s:
            row, path = self._visible(s, principal, ref, Permission.ACCOUNT_MANAGE, lock=True)
            key = s.get(AccountKeyRow, key_id)
            if key is None or key.account_id != row.id:
                raise AccountKeyNotFound()
            if self._key_count(s, row) <= 1:
                raise LastAccountKey(
                    "this is the account's only key: add its replacement first, or disable "
                    "the account"
                )
            s.delete(key)
            row.updated_at = self._clock.now()
            self._end_access_tokens(s, row)
            self._key_event(s, EventKind.ACCOUNT_KEY_REMOVED, principal, row, path, key, ctx)
            s.flush()
            return self._wire(s, row)
