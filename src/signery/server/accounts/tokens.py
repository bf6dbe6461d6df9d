"""The token endpoint (RFC 7523 JWT bearer grant) and Signery's access tokens.

A built-in account proves possession of its registered private key by signing
a short-lived assertion; the server answers with a 15-minute access token.
Every rule below is checked, in this order, and each refusal is audited:

1. the grant type is ``urn:ietf:params:oauth:grant-type:jwt-bearer`` (RFC 7523 §2.1);
2. the JWT header's ``alg`` is one pinned to a registered key's type — never
   ``none``, never HMAC (algorithm-confusion attacks, RFC 8725 §2.1 / §3.1);
3. the signature verifies with a registered key of the account named by ``iss``,
   before any claim is believed (the unverified ``iss`` only selects keys);
4. ``iss == sub == client_id`` (RFC 7523 §3 items 1-2); ``aud`` is exactly the
   server's issuer identifier, a string, not an array (RFC 7523 §3 item 3);
5. ``exp`` is required and in the future, at most 5 minutes after ``iat``;
   ``iat`` is required and not in the future beyond the clock skew (§3 items 4, 6);
6. ``jti`` is required and accepted once, across replicas (§3 item 7): the
   ``used_assertions`` primary key is the guard;
7. the account is enabled and not expired.

The access token names the account's token epoch (``epc``); every use checks it
against the account row, which moves it on when the account is disabled or loses
a key, so no token issued before outlives either (signing/service.py, authn.py).

Before all of it, a source (client address; IPv6: its /64) whose requests were
refused ``auth_token_failures_per_source`` times in the current window is refused
at once (429 ``too_many_failed_attempts``, signery.server.limits); successful
exchanges are never counted. An unauthenticated caller's refusals (the assertion's
signature was not verified) are audited through ``commit_refusal``: one by one up
to a share per source and interval, summed beyond it.
"""

from __future__ import annotations

import secrets
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from signery import protocol as p
from signery.cache import BoundedCache
from signery.errors import (
    AssertionAlgorithmRefused,
    AssertionAudienceMismatch,
    AssertionClaimsInvalid,
    AssertionExpired,
    AssertionLifetimeTooLong,
    AssertionMalformed,
    AssertionReplayed,
    AssertionSignatureInvalid,
    ClientDisabled,
    ClientExpired,
    ErrorKind,
    InvalidGrant,
    InvalidRequest,
    InvalidToken,
    SigneryError,
    TooManyFailedAttempts,
    UnknownClient,
    UnsupportedGrantType,
    UnsupportedMediaType,
)
from signery.ids import AccountId, TsgId
from signery.protocol import AccountStatus, AuditOutcome, PrincipalType, has_control_characters
from signery.server.access.claims import AccessClaims
from signery.server.access.context import RequestContext
from signery.server.accounts.models import AccountKeyRow, AccountRow, UsedAssertionRow
from signery.server.audit.events import ANONYMOUS, Actor, AuditRecord, EventKind, outcome_of
from signery.server.audit.recorder import AuditRecorder
from signery.server.limits.service import AuthLimits
from signery.server.persistence.db import Database
from signery.server.runtime.clock import Clock
from signery.server.tsg.tree import TsgDirectory

ASSERTION_MAX_LIFETIME = timedelta(minutes=5)
CLOCK_SKEW = timedelta(seconds=60)
ACCESS_TOKEN_LIFETIME = timedelta(minutes=15)
MAX_ASSERTION_CHARS = 8192
MAX_JTI_CHARS = 255
ACCESS_TOKEN_SCOPE = "sign"
ACCESS_TOKEN_TYPE = "at+jwt"  # RFC 9068 §2.1: a typed JWT cannot be confused with another kind
ACCESS_TOKEN_ALGORITHM = "HS256"  # our own tokens: keyed by a secret derived from the master key
# Private claim: the account's token epoch at issuance (AccountRow.token_epoch).
# Tokens issued before the claim existed have none and count as epoch 0.
EPOCH_CLAIM = "epc"
STALE_TOKEN = "the access token was issued before the account was disabled or lost a key"
JTI_PRUNE_INTERVAL_SECONDS = 60.0
VERIFIED_CACHE_SIZE = 10_000

# RFC 7518 names, pinned per registered key type. No "none", no HS*.
RSA_ALGORITHMS = ("RS256", "PS256")
EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}
EDDSA_ALGORITHMS = ("EdDSA",)
ASSERTION_ALGORITHMS = ("RS256", "PS256", "ES256", "ES384", "ES512", "EdDSA")

_REQUIRED_ASSERTION_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti"]


def pinned_algorithms(key: object) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return EC_ALGORITHMS.get(key.curve.name, ())
    if isinstance(key, ed25519.Ed25519PublicKey):
        return EDDSA_ALGORITHMS
    return ()


class AccessTokenCodec:
    """Issues and verifies the server's own access tokens (JWT, HS256, typ at+jwt)."""

    def __init__(self, *, secret: bytes, issuer: str, clock: Clock) -> None:
        if len(secret) < 32:
            raise ValueError("access token secret must have 256 bits")
        self._secret = secret
        self.issuer = issuer
        self.audience = f"{issuer}#signing-api"
        self._clock = clock
        # Tokens already verified (exact string -> claims), so a token that is used
        # for many signings costs one JWT verification (~100 µs), not one each.
        self._verified: BoundedCache[str, AccessClaims] = BoundedCache(VERIFIED_CACHE_SIZE)

    def issue(self, account: AccountRow) -> tuple[str, int]:
        now = self._clock.now()
        expires_in = int(ACCESS_TOKEN_LIFETIME.total_seconds())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": account.client_id,
            "acct": account.id,
            "tsg": account.tsg_id,
            EPOCH_CLAIM: account.token_epoch,
            "scope": ACCESS_TOKEN_SCOPE,
            "iat": int(now.timestamp()),
            "exp": int(now.timestamp()) + expires_in,
            "jti": secrets.token_urlsafe(16),
        }
        token = jwt.encode(
            claims,
            self._secret,
            algorithm=ACCESS_TOKEN_ALGORITHM,
            headers={"typ": ACCESS_TOKEN_TYPE},
        )
        return token, expires_in

    def verify(self, token: str) -> AccessClaims:
        if len(token) > MAX_ASSERTION_CHARS:
            raise InvalidToken()
        cached = self._verified.get(token)
        if cached is not None:
            if cached.expires_at > self._clock.now():
                return cached
            raise InvalidToken("access token expired")
        claims = self._verify(token)
        self._verified.put(token, claims)
        return claims

    def _verify(self, token: str) -> AccessClaims:
        try:
            header = jwt.get_unverified_header(token)
            if (
                header.get("typ") != ACCESS_TOKEN_TYPE
                or header.get("alg") != ACCESS_TOKEN_ALGORITHM
            ):
                raise InvalidToken()
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ACCESS_TOKEN_ALGORITHM],  # pinned: our own HMAC, nothing else
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": ["iss", "aud", "sub", "acct", "tsg", "exp", "iat"],
                    "verify_signature": True,
                    "verify_aud": True,
                    "verify_iss": True,
                    "strict_aud": True,
                    # Expiry is checked below against the service clock.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError:
            raise InvalidToken() from None
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= int(self._clock.now().timestamp()):
            raise InvalidToken("access token expired")
        if not all(isinstance(claims.get(c), str) for c in ("sub", "acct", "tsg")):
            raise InvalidToken()
        epoch = claims.get(EPOCH_CLAIM, 0)
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise InvalidToken()
        return AccessClaims(
            account_id=AccountId(claims["acct"]),
            client_id=claims["sub"],
            tsg_id=TsgId(claims["tsg"]),
            expires_at=datetime.fromtimestamp(exp, UTC),
            epoch=epoch,
        )


def parse_token_form(body: bytes, content_type: str | None) -> tuple[str, str]:
    """(grant_type, assertion) from an RFC 6749 §4.5 form body."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("the token endpoint takes application/x-www-form-urlencoded")
    try:
        form = urllib.parse.parse_qs(
            body.decode("ascii"), keep_blank_values=True, strict_parsing=False
        )
    except UnicodeDecodeError:
        raise InvalidRequest("the form body must be ASCII") from None
    # RFC 6749 §3.2: parameters must not be included more than once.
    for name in ("grant_type", "assertion"):
        if len(form.get(name, [])) > 1:
            raise InvalidRequest(f"parameter {name} repeated")
    grant_type = (form.get("grant_type") or [""])[0]
    assertion = (form.get("assertion") or [""])[0]
    if not grant_type:
        raise InvalidRequest("grant_type is required")
    if grant_type != p.JWT_BEARER_GRANT:
        raise UnsupportedGrantType(f"only {p.JWT_BEARER_GRANT} is supported")
    if not assertion:
        raise InvalidRequest("assertion is required")
    return grant_type, assertion


class TokenService:
    def __init__(
        self,
        *,
        db: Database,
        recorder: AuditRecorder,
        clock: Clock,
        directory: TsgDirectory,
        codec: AccessTokenCodec,
        limits: AuthLimits,
    ) -> None:
        self._db = db
        self._recorder = recorder
        self._clock = clock
        self._directory = directory
        self._codec = codec
        self._limits = limits
        self._last_prune = 0.0

    def exchange(
        self, body: bytes, content_type: str | None, ctx: RequestContext
    ) -> p.TokenResponse:
        """Exchange an assertion for an access token, auditing success and every refusal."""
        actor: Actor = ANONYMOUS
        claimed: str | None = None
        account: AccountRow | None = None
        try:
            self._limits.check_token_request(ctx)
        except TooManyFailedAttempts as e:
            self._refused(e, actor, account, claimed, ctx)
            raise
        try:
            _, assertion = parse_token_form(body, content_type)
            claimed = self._claimed_client(assertion)
            account, claims = self._verify(assertion, claimed)
            actor = Actor(PrincipalType.ACCOUNT, account.id, account.name)
            self._check_account(account)
            token, expires_in = self._codec.issue(account)
            self._consume_jti_and_record(account, claims, ctx)
        except SigneryError as e:
            self._refused(e, actor, account, claimed, ctx)
            if e.kind not in (ErrorKind.UNAVAILABLE, ErrorKind.INTERNAL):
                # The caller's fault (not a database down): counted against its source.
                self._limits.token_request_refused(ctx)
            raise
        self._maybe_prune()
        return p.TokenResponse(
            access_token=token, token_type="Bearer", expires_in=expires_in, scope=ACCESS_TOKEN_SCOPE
        )

    # ------------------------------------------------------------ steps

    def _claimed_client(self, assertion: str) -> str:
        """The client the assertion claims to come from. Not trusted: it only picks
        which registered keys to try."""
        if len(assertion) > MAX_ASSERTION_CHARS or assertion.count(".") != 2:
            raise AssertionMalformed()
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AssertionMalformed() from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ASSERTION_ALGORITHMS:
            # "none" and HS* end here, before any key is looked at.
            raise AssertionAlgorithmRefused(f"alg {str(alg)[:16]!r} is not accepted")
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss or len(iss) > 64:
            raise AssertionClaimsInvalid("iss must be the account's client_id")
        if has_control_characters(iss):
            # No client_id holds one (and PostgreSQL cannot look up a NUL).
            raise UnknownClient()
        return iss

    def _verify(self, assertion: str, claimed: str) -> tuple[AccountRow, dict[str, Any]]:
        alg = jwt.get_unverified_header(assertion)["alg"]
        with self._db.read() as s:
            account = s.scalar(select(AccountRow).where(AccountRow.client_id == claimed))
            if account is None:
                raise UnknownClient()
            key_rows = s.scalars(
                select(AccountKeyRow).where(AccountKeyRow.account_id == account.id)
            ).all()
        matching_alg = False
        for row in key_rows:
            key = serialization.load_der_public_key(row.public_key_der)
            pinned = pinned_algorithms(key)
            if alg not in pinned:
                continue
            matching_alg = True
            try:
                claims: dict[str, Any] = jwt.decode(
                    assertion,
                    key,  # type: ignore[arg-type]
                    algorithms=list(pinned),  # pinned to this key's type
                    audience=self._codec.issuer,
                    issuer=account.client_id,
                    options={
                        "require": _REQUIRED_ASSERTION_CLAIMS,
                        "verify_signature": True,
                        "verify_aud": True,
                        "verify_iss": True,
                        # RFC 7523 §3 item 3: aud must be this server, exactly: a
                        # string equal to the issuer id, not an array containing it.
                        "strict_aud": True,
                        # Time rules are checked in _check_times against our clock.
                        "verify_exp": False,
                        "verify_iat": False,
                        "verify_nbf": False,
                    },
                )
            except jwt.InvalidSignatureError:
                continue
            except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as e:
                if isinstance(e, jwt.MissingRequiredClaimError):
                    raise AssertionClaimsInvalid(f"claim {e.claim} is required") from None
                raise AssertionAudienceMismatch() from None
            except jwt.InvalidIssuerError:
                raise AssertionClaimsInvalid("iss must be the account's client_id") from None
            except jwt.PyJWTError:
                raise AssertionMalformed() from None
            self._check_claims(claims, account)
            return account, claims
        if not matching_alg:
            raise AssertionAlgorithmRefused(
                f"alg {alg} does not fit any registered key of this account"
            )
        raise AssertionSignatureInvalid()

    def _check_claims(self, claims: dict[str, Any], account: AccountRow) -> None:
        if claims.get("sub") != account.client_id:
            raise AssertionClaimsInvalid("sub must equal iss (the client_id)")
        jti = claims.get("jti")
        if (
            not isinstance(jti, str)
            or not jti
            or len(jti) > MAX_JTI_CHARS
            or has_control_characters(jti)  # it is stored: PostgreSQL cannot hold a NUL
        ):
            raise AssertionClaimsInvalid(
                f"jti must be 1 to {MAX_JTI_CHARS} characters, none of them a control character"
            )
        exp, iat = claims.get("exp"), claims.get("iat")
        if (
            not isinstance(exp, int)
            or not isinstance(iat, int)
            or isinstance(exp, bool)
            or isinstance(iat, bool)
        ):
            raise AssertionClaimsInvalid("exp and iat must be integer NumericDates")
        now = self._clock.now().timestamp()
        if exp - iat > ASSERTION_MAX_LIFETIME.total_seconds():
            raise AssertionLifetimeTooLong(
                f"exp may be at most {int(ASSERTION_MAX_LIFETIME.total_seconds())} s after iat"
            )
        if exp <= iat:
            raise AssertionClaimsInvalid("exp must be after iat")
        if iat > now + CLOCK_SKEW.total_seconds():
            raise AssertionExpired("iat is in the future")
        if exp <= now - CLOCK_SKEW.total_seconds():
            raise AssertionExpired("assertion expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, int) or nbf > now + CLOCK_SKEW.total_seconds()):
            raise AssertionExpired("assertion not yet valid (nbf)")

    def _check_account(self, account: AccountRow) -> None:
        if account.status == AccountStatus.DISABLED.value:
            raise ClientDisabled()
        if account.valid_until <= self._clock.now():
            raise ClientExpired()

    def _consume_jti_and_record(
        self, account: AccountRow, claims: dict[str, Any], ctx: RequestContext
    ) -> None:
        """Spend the jti and record the issuance in one transaction."""
        expires_at = datetime.fromtimestamp(int(claims["exp"]), UTC) + CLOCK_SKEW
        with self._db.write() as s:
            s.add(
                UsedAssertionRow(
                    client_id=account.client_id, jti=claims["jti"], expires_at=expires_at
                )
            )
            try:
                s.flush()
            except IntegrityError:
                # The primary key says another request, on any replica, used this jti.
                raise AssertionReplayed() from None
            self._recorder.record(
                s,
                AuditRecord(
                    EventKind.TOKEN_ISSUED,
                    AuditOutcome.SUCCEEDED,
                    Actor(PrincipalType.ACCOUNT, account.id, account.name),
                    tsg_id=account.tsg_id,
                    tsg_path=self._directory.path(s, account.tsg_id),
                    context=ctx,
                    details={
                        "client_id": account.client_id,
                        "expires_in": int(ACCESS_TOKEN_LIFETIME.total_seconds()),
                    },
                ),
            )

    def _refused(
        self,
        error: SigneryError,
        actor: Actor,
        account: AccountRow | None,
        claimed: str | None,
        ctx: RequestContext,
    ) -> None:
        details: dict[str, Any] = {"error": getattr(error, "oauth_error", error.code)}
        if claimed is not None and account is None:
            details["claimed_client_id"] = claimed[:64]
        tsg_path = None
        if account is not None:
            with self._db.read() as s:
                tsg_path = self._directory.path(s, account.tsg_id)
        self._recorder.commit_refusal_sync(
            AuditRecord(
                EventKind.TOKEN_REFUSED,
                # A refused grant and a limit are decisions (denied); the rest as usual.
                AuditOutcome.DENIED if isinstance(error, InvalidGrant) else outcome_of(error),
                actor,
                reason=error.code,
                tsg_id=account.tsg_id if account is not None else None,
                tsg_path=tsg_path,
                context=ctx,
                details=details,
            )
        )
        error.audited = True

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < JTI_PRUNE_INTERVAL_SECONDS:
            return
        self._last_prune = now
        with self._db.write() as s:
            s.execute(
                delete(UsedAssertionRow).where(UsedAssertionRow.expires_at < self._clock.now())
            )
