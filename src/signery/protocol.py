"""Wire models shared by the Signery client and server, so the two cannot drift.

Everything here is plain data: pydantic models (frozen, unknown fields refused)
and the string enums that name algorithms, schemes and states on the wire.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

API_PREFIX = "/api/v1"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class Algorithm(StrEnum):
    """Key algorithms a signing key can have (DESIGN.md §2)."""

    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    EC_P256 = "EC_P256"
    EC_P384 = "EC_P384"
    EC_P521 = "EC_P521"

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("RSA_")

    @property
    def is_ec(self) -> bool:
        return self.value.startswith("EC_")


class DigestAlgorithm(StrEnum):
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"

    @property
    def size(self) -> int:
        """Length of a digest in bytes (FIPS 180-4)."""
        return {"sha256": 32, "sha384": 48, "sha512": 64}[self.value]


class SignatureScheme(StrEnum):
    RSA_PKCS1V15 = "rsa-pkcs1v15"
    RSA_PSS = "rsa-pss"
    ECDSA = "ecdsa"


class KeyStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    DISABLED = "disabled"
    EXPIRED = "expired"
    ARCHIVED = "archived"
    DESTROYED = "destroyed"


class VersionStatus(StrEnum):
    """State of one key version (one key pair) of a signing key."""

    PENDING = "pending"  # waiting for its certificate from an external CA
    ACTIVE = "active"  # the current version
    ARCHIVED = "archived"  # superseded by a rotation; verifies, signs only if policy allows
    DESTROYED = "destroyed"  # key material erased in its store


class Weekday(StrEnum):
    MON = "mon"
    TUE = "tue"
    WED = "wed"
    THU = "thu"
    FRI = "fri"
    SAT = "sat"
    SUN = "sun"


class ApprovalStatus(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


# Digests one signing request lists at most: a larger batch of files waits on
# further requests (each still one decision for its digests).
MAX_REQUEST_DIGESTS = 256


class GrantScope(StrEnum):
    """What an approval lets an account sign."""

    # Exactly the listed (digest, digest_algorithm, scheme) items, each a bounded
    # number of times: what approvers saw is what gets signed.
    DIGESTS = "digests"
    # Any digest, within the grant's uses and lifetime: only a pre-approval that
    # says so on purpose (the approver signs off on an account, not an artifact).
    ANY_DIGEST = "any_digest"


class CertificateAuthority(StrEnum):
    NONE = "none"
    BUILTIN = "builtin"
    CONNECTOR = "connector"


class ConnectorKind(StrEnum):
    """How an external CA connector obtains certificates (DESIGN.md §5)."""

    CSR = "csr"  # an administrator downloads the CSR and uploads the issued chain
    EST = "est"  # RFC 7030 enrollment over HTTPS


class CertificateRequestStatus(StrEnum):
    PENDING = "pending"
    ISSUED = "issued"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class AccountStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    EXPIRED = "expired"


class Role(StrEnum):
    SUPERUSER = "superuser"
    KEY_ADMIN = "key_admin"
    KEY_VIEWER = "key_viewer"
    ACCOUNT_ADMIN = "account_admin"
    AUDITOR = "auditor"
    APPROVER = "approver"


class PrincipalType(StrEnum):
    USER = "user"
    ACCOUNT = "account"
    ANONYMOUS = "anonymous"
    SYSTEM = "system"


class AuditOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    DENIED = "denied"
    INVALID = "invalid"
    ERROR = "error"


def decode_base64(text: str) -> bytes:
    """The bytes of canonical RFC 4648 §4 base64; a ValueError for anything else.

    One spelling per value: the standard alphabet only (no URL-safe characters,
    no whitespace), the padding present and nothing after it, the unused bits of
    the last character zero (§3.5). Several spellings of one digest would let the
    text a client sent, the bytes that were signed and the audit trail disagree;
    every base64 value that enters through the API is decoded here."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError("not valid base64") from e
    # b64decode accepts set unused bits and padding after a complete quantum:
    # only the encoding of the decoded bytes is canonical.
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("not canonical base64 (extra padding or unused bits set)")
    return raw


def _decode_b64(value: Any) -> Any:
    return decode_base64(value) if isinstance(value, str) else value


B64Bytes = Annotated[
    bytes,
    BeforeValidator(_decode_b64),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
]


# ------------------------------------------------------------------ what a request may hold

# C0 controls (NUL included: PostgreSQL text cannot hold it), DEL, C1 controls, and
# lone surrogates (not text: no database or terminal encoding can carry them).
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# What multi-line text (PEM, a comment) may hold besides: tab and line breaks.
MULTILINE_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def has_control_characters(text: str) -> bool:
    """True if ``text`` cannot be a name, an id or any one-line value Signery accepts."""
    # Printable ASCII first: the common case, and faster to tell than the search.
    return (
        not (text.isascii() and text.isprintable()) and CONTROL_CHARACTERS.search(text) is not None
    )


class _Multiline:
    """Marks a text field that may span lines (PEM, a description, a comment):
    it may hold tabs and line breaks, still no other control character."""

    def __repr__(self) -> str:
        return "MULTILINE"


MULTILINE = _Multiline()
MultilineText = Annotated[str, MULTILINE]


class _Encoded:
    """Marks a text field its own decoder parses strictly (the base64 of a digest,
    :func:`decode_base64`): anything but its alphabet, control characters
    included, is that decoder's refusal, with its precise code."""

    def __repr__(self) -> str:
        return "ENCODED"


ENCODED = _Encoded()
EncodedText = Annotated[str, ENCODED]


def _in_utc(value: datetime) -> datetime:
    """The instant in UTC; a time without an offset is taken as UTC. Refuses one
    that cannot be converted: 9999-12-31T23:59:59-14:00 is in year 10000 in UTC,
    0001-01-01T00:00:00+14:00 before year 1."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise PydanticCustomError(
            "instant_out_of_range", "must lie within years 1 to 9999 once converted to UTC"
        ) from None


# A point in time a query names (since, until, after), in UTC.
Instant = Annotated[datetime, AfterValidator(_in_utc)]


def _refused_text(value: Any, pattern: re.Pattern[str]) -> PydanticCustomError | None:
    """Why ``value`` (a field's validated value) is refused: a text in it with a
    character ``pattern`` matches. Nested wire models were checked by their own
    validator."""
    if isinstance(value, str):
        if pattern.search(value) is None:
            return None
        return PydanticCustomError(
            "control_characters",
            "control characters are not allowed"
            + (" (except tab and line breaks)" if pattern is MULTILINE_CONTROL_CHARACTERS else ""),
        )
    items: Any = ()
    if isinstance(value, list | tuple | set | frozenset):
        items = value
    elif isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    for item in items:
        refused = _refused_text(item, pattern)
        if refused is not None:
            return refused
    return None


# Values that may hold text (nested wire models check themselves).
_CONTAINERS = (list, tuple, set, frozenset, dict)


def _marked(field: FieldInfo, marker: object) -> bool:
    # Annotated[str, MARKER] puts the marker in the field's metadata;
    # Annotated[str, MARKER] | None keeps it inside the union.
    return marker in field.metadata or any(
        marker in getattr(arg, "__metadata__", ()) for arg in get_args(field.annotation)
    )


class WireModel(BaseModel):
    """Base of all wire models (requests): immutable, unknown fields refused, and
    no control character in any text, so that none reaches a database (PostgreSQL
    cannot store a NUL), a log line or a terminal. Fields marked ``MULTILINE``
    may hold tabs and line breaks."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Per field: the characters its text may not hold (set for each subclass).
    _refuses: ClassVar[dict[str, re.Pattern[str]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._refuses = {
            name: MULTILINE_CONTROL_CHARACTERS if _marked(field, MULTILINE) else CONTROL_CHARACTERS
            for name, field in cls.model_fields.items()
            if not _marked(field, ENCODED)
        }

    # One model validator, not a validator per field: this runs on every signing
    # request, and it costs one Python call instead of one per field.
    @model_validator(mode="after")
    def _no_control_characters(self) -> Self:
        refuses = type(self)._refuses
        for name, value in self.__dict__.items():
            if isinstance(value, str):
                # Printable ASCII first: the common case, and faster to tell.
                if value.isascii() and value.isprintable():
                    continue
                if name not in refuses or refuses[name].search(value) is None:
                    continue
            elif name not in refuses or not isinstance(value, _CONTAINERS):
                continue
            refused = _refused_text(value, refuses[name])
            if refused is not None:
                raise ValidationError.from_exception_data(
                    type(self).__name__,
                    [InitErrorDetails(type=refused, loc=(name,), input=value)],
                )
        return self


class ResponseModel(BaseModel):
    """Base of responses: immutable; clients ignore fields added by newer servers."""

    model_config = ConfigDict(frozen=True, extra="ignore")


# ------------------------------------------------------------------ problems


class Problem(ResponseModel):
    """RFC 9457 problem details, with Signery's stable ``code``."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    code: str
    instance: str | None = None
    request_id: str | None = None


# ------------------------------------------------------------------ discovery


class ServerMetadata(ResponseModel):
    """What a client needs to know before it authenticates (RFC 8414 subset)."""

    issuer: str
    token_endpoint: str
    grant_types_supported: list[str]
    token_endpoint_auth_signing_alg_values_supported: list[str]
    version: str


class TokenResponse(ResponseModel):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int
    scope: str


# ------------------------------------------------------------------ TSGs


class TsgCreate(WireModel):
    name: str = Field(min_length=1, max_length=128)
    parent_id: str | None = Field(
        default=None, description="Parent TSG id; the root TSG when omitted"
    )


class Tsg(ResponseModel):
    id: str
    name: str
    parent_id: str | None
    depth: int
    created_at: datetime


class TsgTree(ResponseModel):
    id: str
    name: str
    children: list[TsgTree]


# ------------------------------------------------------------------ users, tokens, roles


class UserCreate(WireModel):
    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    password: str | None = Field(default=None, min_length=12, max_length=1024)
    tsg_id: str | None = None


class User(ResponseModel):
    id: str
    username: str
    tsg_id: str
    is_active: bool
    created_at: datetime


class UserCreated(User):
    password: str | None = Field(
        default=None, description="Generated password, shown once when none was given"
    )


class ApiTokenCreate(WireModel):
    name: str = Field(min_length=1, max_length=64)
    expires_in_days: int | None = Field(
        default=None,
        ge=1,
        le=3650,
        description="Days until the token expires, at most the server's maximum "
        "(api_token_max_lifetime_days, 90 by default); omitted: that maximum. "
        "API tokens always expire: null is refused.",
    )


class ApiToken(ResponseModel):
    id: str
    name: str
    user_id: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked: bool


class ApiTokenCreated(ApiToken):
    token: str = Field(description="The secret; shown once, stored only as a hash")


class RoleBindingCreate(WireModel):
    principal_type: PrincipalType = PrincipalType.USER
    principal_id: str
    role: Role
    tsg_id: str


class RoleBinding(ResponseModel):
    id: str
    principal_type: PrincipalType
    principal_id: str
    role: Role
    tsg_id: str
    created_at: datetime


# ------------------------------------------------------------------ built-in accounts


class AccountCreate(WireModel):
    name: str = Field(min_length=1, max_length=128)
    tsg_id: str | None = None
    validity_days: int = Field(default=365, ge=1, le=3650)
    public_key_pem: MultilineText | None = Field(
        default=None,
        description="Upload a public key (RSA >= 2048, EC P-256/384/521, Ed25519); "
        "when omitted the server generates a key pair and returns the private key once",
    )
    key_algorithm: str = Field(
        default="EC_P256",
        description="Algorithm of a server-generated key pair: EC_P256, EC_P384, RSA_3072, ED25519",
    )


class AccountKey(ResponseModel):
    id: str
    algorithm: str
    fingerprint: str
    public_key_pem: str
    created_at: datetime


class Account(ResponseModel):
    id: str
    client_id: str
    name: str
    tsg_id: str
    status: AccountStatus
    valid_until: datetime
    created_at: datetime
    keys: list[AccountKey]


class AccountCreated(Account):
    private_key_pem: str | None = Field(
        default=None, description="PKCS#8 PEM of a generated key pair; returned once, never stored"
    )


class AccountKeyAdd(WireModel):
    public_key_pem: MultilineText


# ------------------------------------------------------------------ signing keys


class KeySubject(WireModel):
    common_name: str | None = Field(default=None, max_length=64)
    organization: str | None = Field(default=None, max_length=64)
    organizational_unit: str | None = Field(default=None, max_length=64)
    country: str | None = Field(default=None, min_length=2, max_length=2)
    email: str | None = Field(default=None, max_length=128)


# At most this many patterns per subject attribute in a subject policy.
SUBJECT_POLICY_MAX_PATTERNS = 32
SubjectPatterns = Annotated[
    list[str],
    Field(default_factory=list, max_length=SUBJECT_POLICY_MAX_PATTERNS),
]


class SubjectPolicyRules(WireModel):
    """The subjects the built-in CA certifies in a TSG's subtree: for each attribute
    of :class:`KeySubject`, patterns one of which the attribute's value must match.

    ``*`` matches any run of characters (none included), ``?`` exactly one, and
    ``\\`` makes the next character literal; matching is case-sensitive. An absent
    attribute is matched as the empty string: ``*`` allows any value or none,
    ``""`` allows only none, ``?*`` requires a value. An attribute with no patterns
    may not appear in a subject at all."""

    common_name: SubjectPatterns
    organization: SubjectPatterns
    organizational_unit: SubjectPatterns
    country: SubjectPatterns
    email: SubjectPatterns


class SubjectPolicyEffect(StrEnum):
    """What the built-in CA certifies in a TSG, given the policies on its path."""

    # Every policy from the root down to the TSG must allow the subject.
    POLICIES = "policies"
    # The root TSG without a policy of its own: any subject.
    ANY_SUBJECT = "any_subject"
    # A TSG below the root with no policy on its path: no certificate at all.
    REFUSED = "refused"


class SubjectPolicyLevel(ResponseModel):
    tsg_id: str
    rules: SubjectPolicyRules
    updated_at: datetime
    updated_by: str | None = Field(description="Id of the user who set it")


class SubjectPolicy(ResponseModel):
    tsg_id: str
    own: SubjectPolicyLevel | None = Field(description="The policy set on this TSG, if any")
    path: list[SubjectPolicyLevel] = Field(
        description="Every policy on the path from the root TSG down to this one (root "
        "first, this TSG's own last): a subject must satisfy each of them"
    )
    effect: SubjectPolicyEffect


class KeyCreate(WireModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    tsg_id: str | None = None
    algorithm: Algorithm
    storage: str = "builtin"
    certificate_authority: CertificateAuthority = CertificateAuthority.NONE
    ca_connector: str | None = Field(
        default=None,
        max_length=128,
        description="With certificate_authority=connector: the connector's name or id "
        "(configured on the key's TSG or an ancestor)",
    )
    subject: KeySubject | None = None
    validity_days: int = Field(default=365, ge=1, le=3650)
    description: MultilineText | None = Field(default=None, max_length=1024)
    rotation_period_days: int | None = Field(
        default=None, ge=1, le=3650, description="Rotate the key every N days (default: never)"
    )


# ------------------------------------------------------------------ key lifecycle and policy


class KeyRotate(WireModel):
    """Body of ``POST /api/v1/keys/{key}/rotate`` (all optional)."""

    validity_days: int | None = Field(
        default=None, ge=1, le=3650, description="Validity of the new version's certificate"
    )


class KeyRotationSchedule(WireModel):
    """Body of ``PUT /api/v1/keys/{key}/rotation``: rotate every N days (null = never)."""

    rotation_period_days: int | None = Field(default=None, ge=1, le=3650)


class KeyDestroy(WireModel):
    """Body of ``POST /api/v1/keys/{key}/destroy``: destroy after 7 to 30 days."""

    after_days: int = Field(default=30, ge=7, le=30)


class TimeWindow(WireModel):
    """Days and hours (``HH:MM``, end exclusive) in the policy's time zone.
    ``end`` before ``start`` is a window across midnight."""

    days: list[Weekday] = Field(default_factory=lambda: list(Weekday), min_length=1)
    start: str = Field(default="00:00", pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    end: str = Field(default="24:00", pattern=r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")


class ApprovalPolicy(WireModel):
    """M-of-N approval before an account may sign with the key."""

    required: int = Field(default=1, ge=1, le=10, description="M: approvals needed")
    approvers: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Users (name or id) who may approve; empty = anyone holding the "
        "approver role (or superuser) on the key's TSG",
    )
    grant_max_uses: int | None = Field(
        default=1, ge=1, description="Uses of the grant an approval creates; null = unlimited"
    )
    grant_ttl_hours: int = Field(default=24, ge=1, le=24 * 90, description="Lifetime of that grant")
    request_ttl_hours: int = Field(
        default=72, ge=1, le=24 * 30, description="How long a request waits for approvers"
    )


class KeyPolicy(WireModel):
    """Per-key signing policy. Every field is optional; an absent one restricts nothing.

    Checked on every signing in the one authorization place; each refusal is
    audited with its reason code."""

    signers: list[str] | None = Field(
        default=None,
        max_length=1000,
        description="Built-in accounts (name or id) that may sign; each must be able to "
        "reach the key (an account in the key's TSG or a TSG above it)",
    )
    signer_tsgs: list[str] | None = Field(
        default=None,
        max_length=1000,
        description="TSGs (ids: the key's TSG or TSGs above it) whose subtrees' accounts may sign",
    )
    allowed_schemes: list[SignatureScheme] | None = Field(default=None, min_length=1)
    allowed_digests: list[DigestAlgorithm] | None = Field(default=None, min_length=1)
    max_signatures_total: int | None = Field(default=None, ge=1)
    max_signatures_per_day: int | None = Field(default=None, ge=1)
    client_ips: list[str] | None = Field(
        default=None, min_length=1, max_length=1000, description="CIDR ranges (IPv4 or IPv6)"
    )
    time_windows: list[TimeWindow] | None = Field(default=None, min_length=1, max_length=50)
    timezone: str = Field(
        default="UTC",
        max_length=64,
        description="IANA time zone of time_windows and of the per-day limit",
    )
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    min_signing_version: int | None = Field(
        default=None, ge=1, description="Oldest version that may still sign (default: current only)"
    )
    approval: ApprovalPolicy | None = None


class KeyUsage(ResponseModel):
    """Signatures counted against the key's usage limits."""

    total: int
    today: int
    day: str = Field(description="The day `today` counts, in the policy's time zone")


class CertificateInfo(ResponseModel):
    serial: str
    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    fingerprint_sha256: str


class CertificateRecord(CertificateInfo):
    """A certificate of a key, current or not (renewals keep the old ones)."""

    key_version: int
    status: str = Field(description="current, superseded, revoked or expired")
    source: str = Field(description="builtin, or the CA connector it came through")
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    chain: list[str] = Field(default_factory=list, description="PEM, leaf first")


class CertificateRenew(WireModel):
    validity_days: int | None = Field(default=None, ge=1, le=3650)


class CertificateReissue(WireModel):
    subject: KeySubject
    validity_days: int | None = Field(default=None, ge=1, le=3650)


class CertificateRevoke(WireModel):
    serial: str | None = Field(
        default=None, description="Hex; the current certificate when omitted"
    )
    reason: str = Field(
        default="unspecified",
        description="RFC 5280 reason: unspecified, keyCompromise, superseded, "
        "cessationOfOperation...",
    )


class CaCertificateRevoke(WireModel):
    reason: str = Field(
        default="unspecified",
        description="RFC 5280 reason: unspecified, keyCompromise, superseded, "
        "cessationOfOperation...",
    )


class CaCertificate(CertificateInfo):
    """A certificate the built-in CA issued, as the CA records it."""

    status: str = Field(description="valid, revoked or expired")
    key_id: str | None = Field(
        default=None,
        description="The signing key it certifies; null for a certificate enrolled over EST "
        "(Signery does not hold that key)",
    )
    key_version: int | None = None
    revoked_at: datetime | None = None
    revocation_reason: str | None = None


class CertificateRequest(ResponseModel):
    """A CSR made (and signed) through the key's store for its CA connector."""

    id: str
    key_version: int
    connector_id: str
    purpose: str = Field(description="enroll, renew, reissue or rotate")
    status: CertificateRequestStatus
    error: str | None = None
    csr_pem: str
    created_at: datetime
    updated_at: datetime


class KeyVersion(ResponseModel):
    version: int
    status: KeyStatus
    public_key_pem: str
    certificate: CertificateInfo | None
    created_at: datetime
    archived_at: datetime | None = None
    destroyed_at: datetime | None = None
    certificate_chain: list[str] = Field(
        default_factory=list, description="PEM, leaf first: to verify its old signatures"
    )


class SigningKey(ResponseModel):
    id: str
    name: str
    tsg_id: str
    algorithm: Algorithm
    storage: str
    certificate_authority: CertificateAuthority
    status: KeyStatus
    current_version: int
    description: str | None
    schemes: list[SignatureScheme]
    public_key_pem: str
    certificate_chain: list[str] = Field(description="PEM certificates, leaf first, root last")
    versions: list[KeyVersion]
    created_at: datetime
    ca_connector_id: str | None = None
    policy: KeyPolicy | None = None
    usage: KeyUsage | None = Field(
        default=None, description="Counted signatures, when the policy has usage limits"
    )
    rotation_period_days: int | None = None
    next_rotation_at: datetime | None = None
    destroy_at: datetime | None = Field(
        default=None, description="When a scheduled destruction erases the key material"
    )
    destroyed_at: datetime | None = None
    certificate_request: CertificateRequest | None = Field(
        default=None, description="The newest request to the key's CA connector, if any"
    )


class SigningKeyVersionSummary(ResponseModel):
    """An earlier version of a key, as the signing plane shows it: its public key
    still verifies the signatures made before a rotation."""

    version: int
    status: VersionStatus
    public_key_pem: str
    created_at: datetime


class SigningKeySummary(ResponseModel):
    """What an account sees of a key on the signing plane."""

    id: str
    name: str
    tsg_id: str
    distance: int | None = Field(
        default=None,
        description="TSG levels between the account's TSG and the key's (0: the account's "
        "own TSG). A key name resolves to the nearest key; keys at the same distance are "
        "ambiguous. Absent from older servers",
    )
    usable: bool = Field(
        default=True,
        description="Whether this account can sign with the key now (listed only with "
        "?all=true when false)",
    )
    unusable_reason: str | None = Field(
        default=None,
        description="Why it cannot: the error code the sign endpoint answers with "
        "(key_disabled, certificate_revoked, signer_not_allowed...)",
    )
    algorithm: Algorithm
    status: KeyStatus
    current_version: int
    schemes: list[SignatureScheme]
    public_key_pem: str
    certificate_chain: list[str]
    version_created_at: datetime | None = Field(
        default=None,
        description="When the current key version was made (stable for the version): "
        "the creation time in the key's OpenPGP fingerprint. Absent from older servers",
    )
    previous_versions: list[SigningKeyVersionSummary] = Field(
        default_factory=list,
        description="Earlier versions (archived or destroyed), oldest first: their public "
        "keys verify signatures made before a rotation. They do not sign unless the key's "
        "policy allows it (min_signing_version)",
    )


# ------------------------------------------------------------------ external CA connectors


class EstSettings(WireModel):
    """An RFC 7030 EST server. Secrets are write-only: never returned by the API."""

    url: str = Field(
        max_length=2048,
        description="EST base URL, https only: https://ca.example/.well-known/est "
        "(or .../.well-known/est/<label>)",
    )
    username: str | None = Field(default=None, max_length=256, description="HTTP basic auth")
    password: str | None = Field(default=None, max_length=1024, description="Write-only")
    tls_ca_pem: MultilineText | None = Field(
        default=None,
        max_length=256 * 1024,
        description="CA certificates that verify the EST server's TLS certificate "
        "(default: the system's trust store)",
    )
    client_certificate_pem: MultilineText | None = Field(
        default=None, max_length=256 * 1024, description="TLS client certificate (chain), PEM"
    )
    client_key_pem: MultilineText | None = Field(
        default=None, max_length=64 * 1024, description="TLS client private key, PEM; write-only"
    )
    timeout_seconds: float = Field(default=30, gt=0, le=300)


class CaConnectorCreate(WireModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    tsg_id: str | None = None
    kind: ConnectorKind
    public: bool = Field(
        default=False, description="A public CA: only keys in a hardware store may use it"
    )
    roots_pem: MultilineText = Field(
        min_length=1,
        max_length=1024 * 1024,
        description="Trust anchors (PEM) every issued chain must reach",
    )
    est: EstSettings | None = Field(default=None, description="Required for kind=est")


class CaConnectorUpdate(WireModel):
    """Fields to change; omitted fields keep their value. In ``est`` too (the url
    excepted, always given): an omitted setting or secret is kept, null removes it."""

    public: bool | None = None
    roots_pem: MultilineText | None = Field(default=None, min_length=1, max_length=1024 * 1024)
    est: EstSettings | None = None


class EstSettingsInfo(ResponseModel):
    url: str
    username: str | None
    has_password: bool
    tls_ca_pem: str | None
    client_certificate_pem: str | None
    has_client_key: bool
    timeout_seconds: float


class CaConnector(ResponseModel):
    id: str
    name: str
    tsg_id: str
    kind: ConnectorKind
    public: bool
    roots_pem: str
    roots: list[CertificateInfo]
    est: EstSettingsInfo | None = None
    created_at: datetime


class CertificateUpload(WireModel):
    chain_pem: MultilineText = Field(
        min_length=1,
        max_length=1024 * 1024,
        description="The issued certificate and its chain (PEM, any order)",
    )


# ------------------------------------------------------------------ signing


class ClientProcess(WireModel):
    """The local process a signing was made for, as the PKCS#11 agent sees it
    (``SO_PEERCRED`` and ``/proc``): recorded in the signing's audit event."""

    pid: int = Field(ge=0)
    executable: str | None = Field(default=None, max_length=1024)
    executable_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    command_line: str | None = Field(default=None, max_length=1024)
    user: str | None = Field(default=None, max_length=256)


class ClientInfo(WireModel):
    machine: str | None = Field(default=None, max_length=256)
    tool: str | None = Field(default=None, max_length=256)
    process: ClientProcess | None = Field(
        default=None, description="The calling tool's process, when a local agent signs for it"
    )


class SignRequest(WireModel):
    """Body of ``POST /api/v1/signing/keys/{key}/sign``.

    ``digest_algorithm`` and ``scheme`` are strings on the wire so that the server
    can answer an unknown value with its precise error code (``unsupported_scheme``)
    instead of a generic validation error.
    """

    digest: EncodedText = Field(
        description="Canonical base64 (RFC 4648) of the digest", max_length=256
    )
    digest_algorithm: str = Field(examples=["sha256", "sha384", "sha512"], max_length=32)
    scheme: str = Field(examples=["rsa-pkcs1v15", "rsa-pss", "ecdsa"], max_length=32)
    client: ClientInfo | None = None
    key_version: int | None = Field(
        default=None,
        ge=1,
        description="Sign with this version (default: the current one); older versions "
        "sign only when the key's policy sets min_signing_version",
    )
    justification: MultilineText | None = Field(
        default=None,
        max_length=1024,
        description="Shown to approvers when the key requires approval",
    )


class SignResponse(ResponseModel):
    signature: B64Bytes = Field(description="Base64; ECDSA signatures are DER-encoded")
    key_id: str
    key_name: str
    key_version: int
    algorithm: Algorithm
    digest_algorithm: DigestAlgorithm
    scheme: SignatureScheme
    certificate_chain: list[str]
    request_id: str | None = None


class AuditPrincipal(ResponseModel):
    type: PrincipalType
    id: str | None
    name: str | None


class ApprovalDecision(ResponseModel):
    approver_type: PrincipalType
    approver_id: str
    approver_name: str | None
    decision: str = Field(description="approve or deny")
    comment: str | None
    created_at: datetime


class DigestToSign(WireModel):
    """One artifact an approval covers: the digest exactly as the account will send
    it, with its algorithm and the signature scheme."""

    digest: str = Field(
        pattern=r"^[0-9a-fA-F]{40,128}$",
        description="Hex of the digest (what sha256sum prints for a raw signature)",
    )
    digest_algorithm: DigestAlgorithm
    scheme: SignatureScheme


class ApprovedDigest(ResponseModel):
    """One (digest, digest_algorithm, scheme) item of a signing request or grant."""

    digest_algorithm: DigestAlgorithm
    digest: str = Field(description="Hex")
    scheme: SignatureScheme
    uses: int = Field(default=0, description="Signatures made for it with the grant")


class SigningGrant(ResponseModel):
    id: str
    key_id: str
    key_name: str
    account_id: str
    account_name: str | None
    request_id: str | None
    scope: GrantScope = Field(
        default=GrantScope.ANY_DIGEST,
        description="digests: signs only the listed digests; any_digest: any digest "
        "(a pre-approval that said so)",
    )
    digests: list[ApprovedDigest] = Field(
        default_factory=list, description="What it signs (scope digests), with each one's uses"
    )
    max_uses: int | None = Field(
        description="Uses of each digest (scope digests) or in all (any_digest); "
        "null = unlimited (then it always expires)"
    )
    uses: int = Field(description="Signatures made with the grant, in all")
    expires_at: datetime
    revoked_at: datetime | None
    created_at: datetime
    status: str = Field(description="valid, used_up, expired or revoked")


class SigningPending(ResponseModel):
    """HTTP 202 from the sign endpoint: the key requires approval and the account
    has no valid grant. Poll ``GET /api/v1/signing/requests/{request_id}`` (same
    model) and sign again once it is approved: the signing then uses the grant."""

    request_id: str
    status: ApprovalStatus
    key_id: str
    key_name: str
    required_approvals: int
    approvals: int
    expires_at: datetime
    comment: str | None = Field(
        default=None, description="The denying approver's comment, once denied"
    )
    grant: SigningGrant | None = Field(
        default=None, description="The grant the approval created, once approved"
    )


class ApprovalRequest(ResponseModel):
    """A signing request waiting for (or decided by) approvers."""

    id: str
    key_id: str
    key_name: str
    tsg_id: str
    account_id: str
    account_name: str | None
    requested_by: AuditPrincipal
    status: ApprovalStatus
    required_approvals: int
    approvals: int
    scope: GrantScope = Field(
        description="digests: approving signs exactly the listed digests; any_digest: a "
        "pre-approval for any digest"
    )
    digests: list[ApprovedDigest] = Field(
        description="Every artifact the request covers (a batch of files is one request); "
        "fixed from the first decision on"
    )
    digest_algorithm: str | None = Field(
        default=None, description="Deprecated (read digests): set when it lists exactly one"
    )
    digest: str | None = Field(
        default=None, description="Deprecated (read digests): set when it lists exactly one"
    )
    scheme: str | None = Field(
        default=None, description="Deprecated (read digests): set when it lists exactly one"
    )
    client_machine: str | None
    client_tool: str | None
    justification: str | None
    grant_max_uses: int | None
    grant_ttl_hours: float
    decisions: list[ApprovalDecision]
    grant: SigningGrant | None
    expires_at: datetime
    created_at: datetime
    updated_at: datetime


class ApprovalDecide(WireModel):
    """Body of ``POST /api/v1/approvals/{id}/approve`` and ``.../deny``."""

    comment: MultilineText | None = Field(default=None, max_length=2048)
    max_uses: int | None = Field(
        default=None, ge=1, description="Narrow the grant: at most this many uses"
    )
    unlimited: bool = Field(
        default=False, description="Unlimited uses (expires_in_hours is then mandatory)"
    )
    expires_in_hours: int | None = Field(
        default=None, ge=1, le=24 * 90, description="Narrow the grant's lifetime"
    )
    digest_count: int | None = Field(
        default=None,
        ge=0,
        description="How many digests you reviewed: refused (409 approval_request_changed) "
        "when the request lists another number, so an approval covers what you saw",
    )


class PreApprovalCreate(WireModel):
    """Body of ``POST /api/v1/approvals``: approve signing ahead of a release.

    ``scope`` is required, with no default: ``digests`` with the list of what may be
    signed, or ``any_digest`` to approve the account's signing of anything."""

    key: str = Field(min_length=1, max_length=128, description="Key name or id")
    key_tsg_id: str | None = None
    account: str = Field(min_length=1, max_length=128, description="Account name or id")
    scope: GrantScope
    digests: list[DigestToSign] | None = Field(
        default=None,
        max_length=MAX_REQUEST_DIGESTS,
        description="With scope digests (required there, refused otherwise): what the "
        "account may sign",
    )
    max_uses: int | None = Field(default=1, ge=1)
    unlimited: bool = False
    expires_in_hours: int = Field(default=24, ge=1, le=24 * 90)
    comment: MultilineText | None = Field(default=None, max_length=2048)


# ------------------------------------------------------------------ audit and usage


class AuditEvent(ResponseModel):
    id: str
    seq: int = Field(description="Position in this database's audit trail (the paging cursor)")
    time: datetime
    kind: str
    outcome: AuditOutcome
    reason: str | None
    tsg_id: str | None
    principal: AuditPrincipal
    key_id: str | None
    key_version: int | None
    algorithm: str | None
    digest: str | None
    client_ip: str | None
    user_agent: str | None
    client_machine: str | None
    client_tool: str | None
    request_id: str | None
    node_id: str
    details: dict[str, Any]
    # The hash chain (None on events written before it existed): what
    # `signery audit verify` needs to check an event through the API.
    tsg_path: str | None = None
    node_seq: int | None = Field(default=None, description="Position in its node's hash chain")
    prev_hash: str | None = Field(default=None, description="Hash of the node's previous event")
    hash: str | None = Field(default=None, description="SHA-256 of the canonical encoding (hex)")


class AuditEventPage(ResponseModel):
    events: list[AuditEvent]
    next_cursor: str | None


class AuditCheckpoint(ResponseModel):
    """A signed statement of one node's hash-chain head."""

    id: str
    node_id: str
    seq: int
    head_hash: str
    signing_key_id: str
    created_at: datetime
    payload: str = Field(description="The canonical JSON that was signed")
    signature: B64Bytes = Field(description="ECDSA P-256 SHA-256 over payload, DER, base64")


class AuditCheckpointList(ResponseModel):
    checkpoints: list[AuditCheckpoint]


class AuditSigningKey(ResponseModel):
    """The public key that verifies audit checkpoints."""

    id: str
    algorithm: str
    public_key_pem: str
    created_at: datetime


class ExportFormat(StrEnum):
    """Formats of ``GET /api/v1/audit/export``: JSON lines, or CSV with a header row."""

    JSONL = "jsonl"
    CSV = "csv"


class UsageScope(StrEnum):
    """What a usage counter counts: a key, one version of a key, an account, a TSA."""

    KEY = "key"
    KEY_VERSION = "key_version"
    ACCOUNT = "account"
    TSA = "tsa"


class UsageCounter(ResponseModel):
    subject_type: str = Field(description="key, key_version, account or tsa")
    subject_id: str = Field(description="The key, account or TSA id; a key version's row id")
    name: str | None = Field(description="The key's, account's or TSA's name")
    tsg_id: str | None
    key_id: str | None = Field(default=None, description="For a key version: its key")
    version: int | None = Field(default=None, description="For a key version: its number")
    day: date | None = Field(default=None, description="With group_by=day: the day (UTC)")
    successes: int
    failures: int = Field(description="Invalid requests and errors")
    denied: int = Field(default=0, description="Refused by a decision (access, policy, limits)")
    last_used_at: datetime | None = Field(
        default=None, description="Last success (lifetime counters only)"
    )


class UsageReport(ResponseModel):
    since: date | None = Field(default=None, description="First day counted (UTC), if limited")
    until: date | None = Field(default=None, description="Last day counted (UTC), if limited")
    counters: list[UsageCounter]


class KeyStoreInfo(ResponseModel):
    name: str
    kind: str
    healthy: bool
    detail: str
    algorithms: list[Algorithm]


class Health(ResponseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
