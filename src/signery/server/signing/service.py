"""The signing plane: a built-in account signs a digest with a key it may use.

Order of checks for ``POST /api/v1/signing/keys/{key}/sign`` (DESIGN.md §2):
access token valid (done by the caller) -> account enabled, token of the
account's current epoch, account not expired -> key visible to the account's
TSG subtree -> key active -> request well formed, digest length matching its
algorithm, scheme fitting the key -> sign in the key store -> verify the
signature with the public key (verify-after-sign) -> commit the audit event and
the usage counters in one transaction -> only then return the signature. Every
refusal is audited with its reason code.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio.to_thread
from pydantic import ValidationError

from signery import protocol as p
from signery.cache import BoundedCache
from signery.crypto import (
    Hashed,
    PublicKey,
    check_scheme,
    public_key_pem,
    schemes_for,
    verify_signature,
)
from signery.errors import (
    AccountDisabled,
    AccountExpired,
    CertificateExpired,
    CertificateRevoked,
    ClientIpNotAllowed,
    ConfigurationError,
    InvalidDigestEncoding,
    InvalidToken,
    KeyDestroyed,
    KeyDisabled,
    KeyNameAmbiguous,
    KeyNotActive,
    KeyNotFound,
    KeyNotYetValid,
    KeyValidityEnded,
    KeyVersionNotAllowed,
    KeyVersionNotFound,
    MalformedJson,
    OutsideSigningWindow,
    PolicyDigestNotAllowed,
    PolicySchemeNotAllowed,
    SignatureVerificationFailed,
    SignerNotAllowed,
    SigneryError,
    UnsupportedDigestAlgorithm,
    UnsupportedScheme,
    ValidationFailed,
)
from signery.ids import AccountId, KeyId, KeyVersionId, TsgId
from signery.keystores import KeyContext, KeyHandle, KeyStoreRegistry
from signery.protocol import (
    AccountStatus,
    Algorithm,
    AuditOutcome,
    DigestAlgorithm,
    KeyStatus,
    PrincipalType,
    VersionStatus,
)
from signery.refs import KeyRef
from signery.server.access.authz import (
    Denied,
    KeyUseFacts,
    SigningFacts,
    decide_key_use,
    decide_signing,
)
from signery.server.access.claims import AccessClaims
from signery.server.access.context import RequestContext
from signery.server.accounts.tokens import STALE_TOKEN
from signery.server.approvals.gate import ApprovalGate, GrantUse, SignAttempt
from signery.server.audit.events import (
    SIGN_KIND_BY_OUTCOME,
    Actor,
    AuditRecord,
    Counted,
    UsageDelta,
    outcome_of,
)
from signery.server.audit.recorder import AuditRecorder
from signery.server.keys.names import distance, nearest
from signery.server.keys.policy import KeyPolicy
from signery.server.keys.service import chain_list, load_public_key_der
from signery.server.persistence.db import Database
from signery.server.runtime.clock import Clock
from signery.server.runtime.metrics import Metrics
from signery.server.signing.quota import UsageQuotas
from signery.server.signing.reads import AccountState, KeyState, SigningReads, VersionState

log = logging.getLogger("signery.signing")

# Parsed public keys and chains kept per process (per key version and certificate).
VERSION_CACHE_SIZE = 4096

# The policy decision's reason code -> the error the signing plane answers with.
POLICY_ERRORS: dict[str, type[SigneryError]] = {
    e.code: e
    for e in (
        SignerNotAllowed,
        PolicySchemeNotAllowed,
        PolicyDigestNotAllowed,
        ClientIpNotAllowed,
        OutsideSigningWindow,
        KeyNotYetValid,
        KeyValidityEnded,
    )
}


@dataclass(frozen=True, slots=True)
class SigningAccount:
    id: AccountId
    client_id: str
    name: str
    tsg_id: TsgId
    tsg_path: str


@dataclass(frozen=True, slots=True)
class UsableKey:
    id: KeyId
    name: str
    tsg_id: TsgId
    tsg_path: str
    algorithm: Algorithm
    version: int
    # The key_versions row id (usage is counted per key version under it).
    version_id: KeyVersionId
    handle: KeyHandle
    public_key: PublicKey
    chain: tuple[str, ...]
    version_created_at: datetime
    # The key's signing policy, parsed once per policy (None: the key has none).
    policy: KeyPolicy | None = None


@dataclass(frozen=True, slots=True)
class ParsedSignRequest:
    hashed: Hashed
    scheme: p.SignatureScheme
    client: p.ClientInfo | None
    key_version: int | None = None
    justification: str | None = None


@dataclass(slots=True)
class _Attempt:
    """What is known so far about a signing attempt, for the audit event of a refusal."""

    account: SigningAccount | None = None
    key: UsableKey | None = None
    hashed: Hashed | None = None
    client: p.ClientInfo | None = None
    # What admission took (a usage-limit slot, a grant use) and must give back
    # if no signature leaves after all; run on a database thread, in order.
    undo: list[Callable[[], None]] = field(default_factory=list)
    # The approval grant whose use this signing took (keys requiring approval).
    grant: GrantUse | None = None


@dataclass(frozen=True, slots=True)
class _Signed:
    account: SigningAccount
    key: UsableKey
    request: ParsedSignRequest
    signature: bytes
    grant: GrantUse | None = None


def parse_sign_request(body: bytes) -> ParsedSignRequest:
    """Raw body -> validated request, each failure with its own stable code."""
    try:
        req = p.SignRequest.model_validate_json(body)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise MalformedJson() from None
        fields = ", ".join(".".join(str(x) for x in err["loc"]) or "body" for err in e.errors())
        raise ValidationFailed(f"invalid fields: {fields}") from None
    try:
        digest_algorithm = DigestAlgorithm(req.digest_algorithm)
    except ValueError:
        raise UnsupportedDigestAlgorithm(
            f"digest_algorithm must be one of {', '.join(d.value for d in DigestAlgorithm)}"
        ) from None
    try:
        scheme = p.SignatureScheme(req.scheme)
    except ValueError:
        raise UnsupportedScheme(
            f"scheme must be one of {', '.join(s.value for s in p.SignatureScheme)}"
        ) from None
    try:
        digest = p.decode_base64(req.digest)
    except ValueError as e:
        raise InvalidDigestEncoding(f"digest: {e}; send base64.b64encode(digest)") from None
    return ParsedSignRequest(
        Hashed(digest_algorithm, digest), scheme, req.client, req.key_version, req.justification
    )


def _add_client_process(details: dict[str, Any], client: p.ClientInfo | None) -> None:
    """The calling tool's process (sent by the PKCS#11 agent) goes into the event:
    an auditor sees which program, with which hash and command line, signed."""
    if client is not None and client.process is not None:
        details["client_process"] = client.process.model_dump(mode="json", exclude_none=True)


class SigningService:
    def __init__(
        self,
        *,
        db: Database,
        recorder: AuditRecorder,
        clock: Clock,
        keystores: KeyStoreRegistry,
        metrics: Metrics,
        approvals: ApprovalGate | None = None,
    ) -> None:
        self._reads = SigningReads(db)
        # Keys whose policy requires approval sign only with a grant (None: such
        # keys are refused, never signed without one).
        self._approvals = approvals
        self._recorder = recorder
        self._clock = clock
        self._keystores = keystores
        self._metrics = metrics
        self._versions: BoundedCache[
            tuple[KeyVersionId, str | None], tuple[PublicKey, tuple[str, ...]]
        ] = BoundedCache(VERSION_CACHE_SIZE)
        self._quotas = UsageQuotas(db)

    # ------------------------------------------------------------ signing

    async def sign(
        self, claims: AccessClaims, key_ref: str, body: bytes, ctx: RequestContext
    ) -> p.SignResponse | p.SigningPending:
        """A signature, or (for a key requiring approval, without a valid grant) the
        signing request that approvers must decide first: HTTP 202, not a signature
        and not counted as one (its audit event is ``signing.approval.requested``)."""
        started = time.perf_counter()
        attempt = _Attempt()
        try:
            signed = await self._sign_checked(claims, key_ref, body, attempt, ctx)
        except SigneryError as e:
            await self._undo(attempt)
            await self._refused(e, claims, key_ref, attempt, ctx)
            self._metrics.signing(outcome_of(e), started)
            raise
        except BaseException:
            # Not one of ours (a bug, a cancelled request): no signature leaves,
            # so what admission took is given back all the same.
            await self._undo(attempt)
            raise
        if isinstance(signed, p.SigningPending):
            self._metrics.signing(AuditOutcome.DENIED, started)
            return signed
        account, key, parsed = signed.account, signed.key, signed.request
        if parsed.client is not None:
            ctx = ctx.with_client(parsed.client.machine, parsed.client.tool)
        # Fail closed: the signature leaves only after its event and counters are
        # durably committed; AuditUnavailable propagates and nothing is returned.
        try:
            await self._commit_success(account, key, parsed, ctx, signed.grant)
        except BaseException:
            await self._undo(attempt)
            raise
        self._metrics.signing(AuditOutcome.SUCCEEDED, started)
        return p.SignResponse(
            signature=signed.signature,
            key_id=key.id,
            key_name=key.name,
            key_version=key.version,
            algorithm=key.algorithm,
            digest_algorithm=parsed.hashed.algorithm,
            scheme=parsed.scheme,
            certificate_chain=list(key.chain),
            request_id=ctx.request_id,
        )

    async def _undo(self, attempt: _Attempt) -> None:
        """Give back what admission took when no signature is returned after all."""
        while attempt.undo:
            step = attempt.undo.pop()
            try:
                # On a worker thread even on SQLite: a step writes, and a write may
                # wait for the audit writer's lock.
                await anyio.to_thread.run_sync(step)
            except Exception:
                # Logged, never raised over the error being reported: an unreturned
                # slot only makes a limit stricter, never looser.
                log.exception("could not give back a usage slot or grant use")

    async def _commit_success(
        self,
        account: SigningAccount,
        key: UsableKey,
        parsed: ParsedSignRequest,
        ctx: RequestContext,
        grant: GrantUse | None = None,
    ) -> None:
        details: dict[str, Any] = {
            "scheme": parsed.scheme.value,
            "digest_algorithm": parsed.hashed.algorithm.value,
        }
        _add_client_process(details, parsed.client)
        if grant is not None:
            # The grant, and whether it was bound to this digest or a pre-approval
            # of any digest: reviewers see which kind of approval let it sign.
            details["grant_id"] = grant.grant_id
            details["grant_scope"] = grant.scope.value
        await self._recorder.commit(
            AuditRecord(
                SIGN_KIND_BY_OUTCOME[AuditOutcome.SUCCEEDED],
                AuditOutcome.SUCCEEDED,
                Actor(PrincipalType.ACCOUNT, account.id, account.name),
                tsg_id=key.tsg_id,
                tsg_path=key.tsg_path,
                key_id=key.id,
                key_version=key.version,
                algorithm=key.algorithm.value,
                digest=parsed.hashed.hex,
                context=ctx,
                details=details,
            ),
            UsageDelta(Counted.SUCCEEDED, key.id, account.id, key.version_id),
        )

    async def _sign_checked(
        self,
        claims: AccessClaims,
        key_ref: str,
        body: bytes,
        attempt: _Attempt,
        ctx: RequestContext,
    ) -> _Signed | p.SigningPending:
        account, key = await self._reads.run(lambda: self._lookup(claims, key_ref, attempt))
        parsed = parse_sign_request(body)
        attempt.hashed, attempt.client = parsed.hashed, parsed.client
        check_scheme(key.algorithm, parsed.scheme)
        if parsed.key_version is not None and parsed.key_version != key.version:
            requested = parsed.key_version
            key = await self._reads.run(lambda: self._other_version(key, requested))
            attempt.key = key
        # A key without a policy pays nothing more: no parsing, no statement.
        policy = key.policy
        if policy is not None:
            self._check_policy(policy, account, parsed, ctx)
            # Approval after the policy's rules (a refused signing never asks
            # approvers) and before the usage limits (a pending one takes no slot).
            if policy.approval is not None:
                pending = await self._admit(account, key, parsed, policy.approval, attempt, ctx)
                if pending is not None:
                    return pending
            if policy.limited:
                # Last before signing: a refusal above never takes a slot.
                attempt.undo.append(
                    await self._quotas.reserve(key.id, policy.rules, self._clock.now())
                )
        store = self._keystores.get(key.handle.store)
        if store.signs_inline(key.algorithm):
            signature = store.sign(key.handle, parsed.hashed, parsed.scheme)
        else:
            signature = await anyio.to_thread.run_sync(
                store.sign, key.handle, parsed.hashed, parsed.scheme
            )
        # Verify-after-sign: a faulty store or a fault attack must not hand out a
        # bad signature (an RSA-CRT fault can even leak the key: Boneh et al. 1997).
        if not verify_signature(key.public_key, parsed.hashed, parsed.scheme, signature):
            raise SignatureVerificationFailed()
        return _Signed(account, key, parsed, signature, attempt.grant)

    async def _admit(
        self,
        account: SigningAccount,
        key: UsableKey,
        parsed: ParsedSignRequest,
        approval: p.ApprovalPolicy,
        attempt: _Attempt,
        ctx: RequestContext,
    ) -> p.SigningPending | None:
        """Take a use of the account's grant for the key (None), or answer with the
        pending signing request approvers must decide."""
        if self._approvals is None:
            raise ConfigurationError("approvals are not available on this server")
        if parsed.client is not None:
            ctx = ctx.with_client(parsed.client.machine, parsed.client.tool)
        request = SignAttempt(
            key_id=key.id,
            key_name=key.name,
            key_version=key.version,
            algorithm=key.algorithm.value,
            tsg_id=key.tsg_id,
            tsg_path=key.tsg_path,
            account_id=account.id,
            account_name=account.name,
            digest_algorithm=parsed.hashed.algorithm.value,
            digest_hex=parsed.hashed.hex,
            scheme=parsed.scheme.value,
            justification=parsed.justification,
            context=ctx,
        )
        # Off the event loop: these are writes (the conditional UPDATE of the grant).
        admitted = await anyio.to_thread.run_sync(self._approvals.admit, request, approval)
        if isinstance(admitted, p.SigningPending):
            return admitted
        use: GrantUse = admitted
        attempt.undo.append(functools.partial(self._approvals.give_back, use))
        attempt.grant = use
        return None

    async def signing_request(self, claims: AccessClaims, request_id: str) -> p.SigningPending:
        """The state of a signing request made for this account (others: not found)."""
        if self._approvals is None:
            raise ConfigurationError("approvals are not available on this server")
        approvals = self._approvals
        account = await self._reads.run(lambda: self._account(claims))
        return await anyio.to_thread.run_sync(approvals.request_for_account, account.id, request_id)

    def _check_policy(
        self,
        policy: KeyPolicy,
        account: SigningAccount,
        parsed: ParsedSignRequest,
        ctx: RequestContext,
    ) -> None:
        """The key's policy, decided in the one authorization place (authz)."""
        decision = decide_signing(
            policy.rules,
            SigningFacts(
                account_id=account.id,
                account_tsg_path=account.tsg_path,
                scheme=parsed.scheme.value,
                digest_algorithm=parsed.hashed.algorithm.value,
                client_ip=ctx.client_ip,
                now=self._clock.now(),
            ),
        )
        if isinstance(decision, Denied):
            raise POLICY_ERRORS[decision.reason]()

    def _lookup(
        self, claims: AccessClaims, key_ref: str, attempt: _Attempt
    ) -> tuple[SigningAccount, UsableKey]:
        """The account is still enabled, and the key it asks for (one statement)."""
        ref = KeyRef.parse(key_ref)
        row, keys = self._reads.account_and_keys(claims.account_id, ref)
        if row is not None and row.client_id == claims.client_id and row.tsg_id == claims.tsg_id:
            # Known before its status is checked, so that a refusal of a disabled
            # or expired account is recorded in its TSG and counted against it.
            attempt.account = SigningAccount(row.id, row.client_id, row.name, row.tsg_id, row.path)
        account = self._checked_account(row, claims)
        attempt.key = self._checked_key(keys, ref, attempt)
        return account, attempt.key

    def close(self) -> None:
        self._reads.close()
        self._quotas.close()

    async def _refused(
        self,
        error: SigneryError,
        claims: AccessClaims,
        key_ref: str,
        attempt: _Attempt,
        ctx: RequestContext,
    ) -> None:
        account, key, hashed = attempt.account, attempt.key, attempt.hashed
        if attempt.client is not None:
            ctx = ctx.with_client(attempt.client.machine, attempt.client.tool)
        outcome = outcome_of(error)
        actor = (
            Actor(PrincipalType.ACCOUNT, account.id, account.name)
            if account
            else Actor(PrincipalType.ACCOUNT, claims.account_id, None)
        )
        account_id = account.id if account else None
        # A disabled or destroyed key is not in use: its refusals are audited but
        # not counted (neither against the key nor the account).
        counted = not isinstance(error, (KeyDisabled, KeyDestroyed))
        # The reference the caller used (cut to a sane length), so that refusals for
        # keys it cannot see are traceable without recording anything about them.
        details: dict[str, Any] = {"key_ref": key_ref[:128]}
        _add_client_process(details, attempt.client)
        await self._recorder.commit(
            AuditRecord(
                SIGN_KIND_BY_OUTCOME[outcome],
                outcome,
                actor,
                reason=error.code,
                tsg_id=key.tsg_id if key else (account.tsg_id if account else claims.tsg_id),
                tsg_path=key.tsg_path if key else (account.tsg_path if account else None),
                key_id=key.id if key else None,
                key_version=key.version if key else None,
                algorithm=key.algorithm.value if key else None,
                digest=hashed.hex if hashed else None,
                context=ctx,
                details=details,
            ),
            UsageDelta(
                Counted.of(outcome),
                key.id if key else None,
                account_id,
                key.version_id if key else None,
            )
            if counted
            else None,
        )
        error.audited = True

    # ------------------------------------------------------------ key listing (signing plane)

    async def usable_keys(
        self, claims: AccessClaims, ctx: RequestContext, *, everything: bool = False
    ) -> list[p.SigningKeySummary]:
        """The keys this account can sign with now; with ``everything``, every key of
        its subtree, each unusable one with the code a signing would be refused
        with (verifying old signatures needs those public keys too)."""
        return await self._reads.run(lambda: self._usable_keys(claims, ctx, everything))

    def _usable_keys(
        self, claims: AccessClaims, ctx: RequestContext, everything: bool
    ) -> list[p.SigningKeySummary]:
        account = self._account(claims)
        status = None if everything else KeyStatus.ACTIVE.value
        rows = self._reads.keys(account.tsg_path, status)
        reasons = {r.id: self._unusable_reason(r, account, ctx) for r in rows}
        if not everything:
            rows = [r for r in rows if reasons[r.id] is None]
        keys = [(self._to_usable(r), r.status) for r in rows]
        previous: dict[str, list[p.SigningKeyVersionSummary]] = {}
        for v in self._reads.previous_versions(account.tsg_path, status):
            previous.setdefault(v.key_id, []).append(
                p.SigningKeyVersionSummary(
                    version=v.version,
                    status=VersionStatus(v.status),
                    public_key_pem=public_key_pem(load_public_key_der(v.public_key_der)),
                    created_at=v.created_at,
                )
            )
        return [
            p.SigningKeySummary(
                id=k.id,
                name=k.name,
                tsg_id=k.tsg_id,
                distance=distance(account.tsg_path, k.tsg_path),
                usable=reasons[k.id] is None,
                unusable_reason=reasons[k.id],
                algorithm=k.algorithm,
                status=KeyStatus(key_status),
                current_version=k.version,
                schemes=list(schemes_for(k.algorithm)),
                public_key_pem=public_key_pem(k.public_key),
                certificate_chain=list(k.chain),
                version_created_at=k.version_created_at,
                previous_versions=previous.get(k.id, []),
            )
            for k, key_status in keys
        ]

    def _unusable_reason(
        self, row: KeyState, account: SigningAccount, ctx: RequestContext
    ) -> str | None:
        """Why this account cannot sign with the key now (the code of the refusal a
        signing would get, in the signing path's order), or None. Per request
        rules (scheme, digest) and usage limits are not known before a request."""
        try:
            key = self._checked_key([row], KeyRef.parse(row.id))
        except SigneryError as e:
            return e.code
        if key.policy is not None:
            decision = decide_key_use(
                key.policy.rules,
                KeyUseFacts(account.id, account.tsg_path, ctx.client_ip, self._clock.now()),
            )
            if isinstance(decision, Denied):
                return decision.reason
        return None

    # ------------------------------------------------------------ lookups

    def _account(self, claims: AccessClaims) -> SigningAccount:
        return self._checked_account(self._reads.account(claims.account_id), claims)

    def _checked_account(self, row: AccountState | None, claims: AccessClaims) -> SigningAccount:
        # Checked on every request, on every replica: disabling an account stops
        # its tokens at once, without waiting for them to expire.
        if row is None or row.client_id != claims.client_id or row.tsg_id != claims.tsg_id:
            raise InvalidToken()
        if row.status == AccountStatus.DISABLED.value:
            raise AccountDisabled()
        if row.token_epoch != claims.epoch:
            # Issued before the account was disabled (and enabled again) or lost a
            # key: such a token never comes back to life.
            raise InvalidToken(STALE_TOKEN)
        if row.valid_until <= self._clock.now():
            raise AccountExpired()
        return SigningAccount(row.id, row.client_id, row.name, row.tsg_id, row.path)

    def _checked_key(
        self, rows: list[KeyState], ref: KeyRef, attempt: _Attempt | None = None
    ) -> UsableKey:
        # A key id is exact; a name resolves to the nearest key (keys.names).
        by_id = [r for r in rows if ref.matches_id(r.id)]
        rows = by_id or nearest(rows, lambda r: r.path)
        if not rows:
            # Keys outside the account's subtree are indistinguishable from missing ones.
            raise KeyNotFound()
        if len(rows) > 1:
            raise KeyNameAmbiguous(
                f"{len(rows)} keys named {ref.name!r} are as near to this account; use the key id"
            )
        row = rows[0]
        if row.status in (KeyStatus.DISABLED.value, KeyStatus.DESTROYED.value):
            if attempt is not None:
                # Named in the refusal's audit event (which counts nothing for it).
                attempt.key = self._to_usable(row)
            raise KeyDisabled() if row.status == KeyStatus.DISABLED.value else KeyDestroyed()
        if row.status != KeyStatus.ACTIVE.value:
            raise KeyNotActive(f"the key is {row.status}")
        # A key with a certificate signs only while it is valid: a signature whose
        # certificate is expired or revoked would not verify anywhere. (A key without
        # a certificate has nothing to expire.)
        self._check_certificate(row.certificate_not_after, row.certificate_revoked_at)
        return self._to_usable(row)

    def _check_certificate(self, not_after: datetime | None, revoked_at: datetime | None) -> None:
        if revoked_at is not None:
            raise CertificateRevoked()
        if not_after is not None and not_after <= self._clock.now():
            raise CertificateExpired()

    def _other_version(self, key: UsableKey, requested: int) -> UsableKey:
        """The version a request names instead of the current one. An archived
        version signs only when the key's policy sets min_signing_version at or
        below it; a destroyed one never does."""
        row = self._reads.version(key.id, requested)
        if row is None:
            raise KeyVersionNotFound(f"the key has no version {requested}")
        if row.status == KeyStatus.DESTROYED.value:
            raise KeyDestroyed(f"version {requested} of the key is destroyed")
        if row.status != KeyStatus.ARCHIVED.value:
            raise KeyVersionNotAllowed(f"version {requested} is {row.status}")
        minimum = key.policy.min_signing_version if key.policy is not None else None
        if minimum is None or minimum > requested:
            raise KeyVersionNotAllowed(
                f"version {requested} is archived and the key's policy does not allow it "
                "(min_signing_version)"
            )
        self._check_certificate(row.certificate_not_after, row.certificate_revoked_at)
        return self._with_version(key, row)

    def _with_version(self, key: UsableKey, v: VersionState) -> UsableKey:
        public_key, chain = self._material(v.version_id, v.certificate_id, v.public_key_der)
        return UsableKey(
            id=key.id,
            name=key.name,
            tsg_id=key.tsg_id,
            tsg_path=key.tsg_path,
            algorithm=key.algorithm,
            version=v.version,
            version_id=v.version_id,
            handle=KeyHandle(
                key.handle.store,
                v.store_ref,
                key.algorithm,
                KeyContext(key.id, v.version, key.tsg_id),
            ),
            public_key=public_key,
            chain=chain,
            version_created_at=v.version_created_at,
            policy=key.policy,
        )

    def _material(
        self, version_id: KeyVersionId, certificate_id: str | None, public_key_der: bytes
    ) -> tuple[PublicKey, tuple[str, ...]]:
        """The parsed public key and chain of a version, cached per (version,
        certificate): both are immutable once written."""
        cache_key = (version_id, certificate_id)
        cached = self._versions.get(cache_key)
        if cached is None:
            public_key = load_public_key_der(public_key_der)
            chain: tuple[str, ...] = ()
            if certificate_id:
                chain = tuple(chain_list(self._reads.chain_pem(certificate_id)))
            cached = (public_key, chain)
            self._versions.put(cache_key, cached)
        return cached

    def _to_usable(self, r: KeyState) -> UsableKey:
        """A key row -> UsableKey (public key and chain from the cache)."""
        cached = self._material(r.version_id, r.certificate_id, r.public_key_der)
        algorithm = Algorithm(r.algorithm)
        return UsableKey(
            id=r.id,
            name=r.name,
            tsg_id=r.tsg_id,
            tsg_path=r.path,
            algorithm=algorithm,
            version=r.version,
            version_id=r.version_id,
            handle=KeyHandle(
                r.storage, r.store_ref, algorithm, KeyContext(r.id, r.version, r.tsg_id)
            ),
            public_key=cached[0],
            chain=cached[1],
            version_created_at=r.version_created_at,
            policy=KeyPolicy.of(r.policy_json),
        )
