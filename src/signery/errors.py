"""The one error vocabulary of Signery, shared by server, client and CLI.

Every error has a stable machine ``code`` (part of the API contract: clients and
scripts branch on it) and a ``kind`` that says what sort of failure it is. The
server maps ``kind`` to an HTTP status in exactly one place (the problem+json
handler); the client maps a problem document back to the same class by ``code``.

Messages must never contain secrets: no tokens, assertions, passwords or key bytes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class ErrorKind(StrEnum):
    """What sort of failure an error is; decides the HTTP status on the server."""

    INVALID_INPUT = "invalid_input"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    TOO_MANY_REQUESTS = "too_many_requests"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class SigneryError(Exception):
    """Base of every error Signery raises on purpose."""

    code: str = "internal_error"
    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.title
        # Extra members go into the problem document (RFC 9457 §3.2 extensions).
        self.extra: dict[str, Any] = extra
        # Set by the service that wrote this refusal's audit event, so the HTTP
        # edge records one event per refusal, never zero and never two.
        self.audited = False
        super().__init__(self.detail)


# ----------------------------------------------------------------- 400 family


class InvalidRequest(SigneryError):
    code = "invalid_request"
    kind = ErrorKind.INVALID_INPUT
    title = "Invalid request"


class MalformedJson(InvalidRequest):
    code = "malformed_json"
    title = "Request body is not valid JSON"


class ValidationFailed(InvalidRequest):
    code = "validation_failed"
    title = "Request failed validation"


class ControlCharacters(InvalidRequest):
    """A path or query string carried a control character (or a NUL): no name,
    id or value Signery knows can hold one, and PostgreSQL cannot even store a NUL."""

    code = "control_characters"
    title = "Control characters are not accepted in a request"


class DigestLengthMismatch(InvalidRequest):
    code = "digest_length_mismatch"
    title = "Digest length does not match the digest algorithm"


class UnsupportedScheme(InvalidRequest):
    code = "unsupported_scheme"
    title = "Unknown signature scheme"


class SchemeNotAllowed(InvalidRequest):
    code = "scheme_not_allowed"
    title = "Signature scheme does not fit the key"


class UnsupportedAlgorithm(InvalidRequest):
    code = "unsupported_algorithm"
    title = "Unsupported algorithm"


class UnsupportedDigestAlgorithm(InvalidRequest):
    code = "unsupported_digest_algorithm"
    title = "Unknown digest algorithm"


class InvalidDigestEncoding(InvalidRequest):
    """The digest is not the canonical base64 of some bytes (RFC 4648 §4, with
    padding, no line breaks, unused bits zero): one digest, one spelling."""

    code = "invalid_digest_encoding"
    title = "Digest is not canonical base64"


class DigestNotAllowed(InvalidRequest):
    code = "digest_not_allowed"
    title = "This key store does not sign this digest with this key type"


class UnknownKeyStore(InvalidRequest):
    code = "unknown_storage"
    title = "No key store with this name is configured"


class InvalidPolicy(InvalidRequest):
    code = "invalid_policy"
    title = "Invalid key policy"


class MethodNotAllowed(InvalidRequest):
    """The path exists, not with this HTTP method (answered with status 405)."""

    code = "method_not_allowed"
    title = "Method not allowed"


class HttpError(InvalidRequest):
    """A refusal by the HTTP layer itself, before any route (the problem's
    ``status`` is the one the framework chose)."""

    code = "http_error"
    title = "HTTP error"


class InvalidGrant(InvalidRequest):
    """RFC 6749 §5.2 ``invalid_grant``: the assertion was refused.

    ``code`` narrows the reason for the audit trail and for operators; the OAuth
    ``error`` member stays ``invalid_grant`` so that generic OAuth clients work.
    """

    code = "invalid_grant"
    title = "Assertion refused"
    oauth_error: ClassVar[str] = "invalid_grant"


class AssertionMalformed(InvalidGrant):
    code = "assertion_malformed"
    title = "Assertion is not a well-formed JWT"


class AssertionSignatureInvalid(InvalidGrant):
    code = "assertion_signature_invalid"
    title = "Assertion signature does not verify with a registered key"


class AssertionAlgorithmRefused(InvalidGrant):
    code = "assertion_algorithm_refused"
    title = "Assertion algorithm is not allowed for the registered key"


class AssertionClaimsInvalid(InvalidGrant):
    code = "assertion_claims_invalid"
    title = "Assertion claims are invalid"


class AssertionAudienceMismatch(InvalidGrant):
    code = "assertion_audience_mismatch"
    title = "Assertion audience is not this server's issuer identifier"


class AssertionExpired(InvalidGrant):
    code = "assertion_expired"
    title = "Assertion has expired or is not yet valid"


class AssertionLifetimeTooLong(InvalidGrant):
    code = "assertion_lifetime_too_long"
    title = "Assertion lifetime exceeds the maximum"


class AssertionReplayed(InvalidGrant):
    code = "assertion_replayed"
    title = "Assertion jti was already used"


class ClientDisabled(InvalidGrant):
    code = "client_disabled"
    title = "Account is disabled"


class ClientExpired(InvalidGrant):
    code = "client_expired"
    title = "Account has expired"


class UnknownClient(InvalidGrant):
    code = "unknown_client"
    title = "Unknown client"


class UnsupportedGrantType(InvalidRequest):
    code = "unsupported_grant_type"
    title = "Unsupported grant type"
    oauth_error: ClassVar[str] = "unsupported_grant_type"


class InvalidPublicKey(InvalidRequest):
    code = "invalid_public_key"
    title = "Public key is not acceptable"


class ApiTokenLifetimeTooLong(InvalidRequest):
    """An API token asked to live longer than ``api_token_max_lifetime_days``, or
    forever (``"expires_in_days": null``). The maximum is in ``max_days``."""

    code = "api_token_lifetime_too_long"
    title = "API token lifetime exceeds the maximum"


class CertificateRejected(InvalidRequest):
    """A certificate from an external CA was refused; the key stays as it was."""

    code = "certificate_rejected"
    title = "The certificate was refused"


class CertificateMalformed(CertificateRejected):
    code = "certificate_malformed"
    title = "The certificate chain could not be read"


class CertificateKeyMismatch(CertificateRejected):
    code = "certificate_key_mismatch"
    title = "No certificate in the chain certifies this key's public key"


class CertificateEkuMissing(CertificateRejected):
    code = "certificate_eku_missing"
    title = "The certificate does not carry the codeSigning extended key usage"


class CertificateUsageInvalid(CertificateRejected):
    code = "certificate_usage_invalid"
    title = "The certificate may not be used for code signing"


class CertificateChainUntrusted(CertificateRejected):
    code = "certificate_chain_untrusted"
    title = "The chain does not reach the connector's trusted roots"


class SubjectPolicyInvalid(InvalidRequest):
    code = "subject_policy_invalid"
    title = "Invalid subject policy"


class CsrInvalid(InvalidRequest):
    code = "csr_invalid"
    title = "The certificate signing request is not acceptable"


class FailureInfo(StrEnum):
    """PKIFailureInfo bits of RFC 3161 §2.4.2, as asn1crypto names them."""

    BAD_ALG = "bad_alg"
    BAD_REQUEST = "bad_request"
    BAD_DATA_FORMAT = "bad_data_format"
    UNACCEPTED_POLICY = "unaccepted_policy"
    UNACCEPTED_EXTENSION = "unaccepted_extensions"


class TimestampQueryRejected(InvalidRequest):
    """A query this TSA will not timestamp. Answered with a TimeStampResp whose
    status is ``rejection`` and whose failInfo is ``failure`` (HTTP 200), not with
    a problem document: RFC 3161 clients read the reason from the PKIStatusInfo."""

    code = "timestamp_query_rejected"
    title = "The timestamp query was rejected"
    failure: ClassVar[FailureInfo] = FailureInfo.BAD_REQUEST


class MalformedTimestampQuery(TimestampQueryRejected):
    code = "timestamp_query_malformed"
    title = "The body is not a DER TimeStampReq"
    failure = FailureInfo.BAD_DATA_FORMAT


class UnsupportedTimestampQueryVersion(TimestampQueryRejected):
    code = "timestamp_query_version"
    title = "Only version 1 timestamp queries are supported"
    failure = FailureInfo.BAD_REQUEST


class UnsupportedImprintAlgorithm(TimestampQueryRejected):
    code = "timestamp_imprint_algorithm"
    title = "The message imprint's hash algorithm is not SHA-256, SHA-384 or SHA-512"
    failure = FailureInfo.BAD_ALG


class ImprintLengthMismatch(TimestampQueryRejected):
    code = "timestamp_imprint_length"
    title = "The message imprint's length does not match its hash algorithm"
    failure = FailureInfo.BAD_DATA_FORMAT


class UnacceptedTimestampPolicy(TimestampQueryRejected):
    code = "timestamp_policy_unaccepted"
    title = "This TSA does not issue timestamps under the requested policy"
    failure = FailureInfo.UNACCEPTED_POLICY


class UnacceptedTimestampExtension(TimestampQueryRejected):
    code = "timestamp_extension_unaccepted"
    title = "This TSA recognizes no request extension"
    failure = FailureInfo.UNACCEPTED_EXTENSION


# ----------------------------------------------------------------- 401 / 403


class AuthenticationFailed(SigneryError):
    code = "unauthenticated"
    kind = ErrorKind.UNAUTHENTICATED
    title = "Authentication required"


class InvalidToken(AuthenticationFailed):
    code = "invalid_token"
    title = "Token is invalid or expired"


class InvalidCredentials(AuthenticationFailed):
    code = "invalid_credentials"
    title = "Invalid username or password"


class AccountDisabled(AuthenticationFailed):
    code = "account_disabled"
    title = "Account is disabled"


class AccountExpired(AuthenticationFailed):
    code = "account_expired"
    title = "Account has expired"


class PermissionDenied(SigneryError):
    code = "permission_denied"
    kind = ErrorKind.FORBIDDEN
    title = "Permission denied"


class HttpsRequired(PermissionDenied):
    code = "https_required"
    title = "This endpoint is served over HTTPS only"


# ----------------------------------------------------------------- 404 / 409


class PolicyRefused(PermissionDenied):
    """The key's signing policy refuses this signing; ``code`` names the rule."""

    code = "policy_refused"
    title = "Refused by the key's signing policy"


class SignerNotAllowed(PolicyRefused):
    code = "signer_not_allowed"
    title = "This account is not among the key's allowed signers"


class PolicySchemeNotAllowed(PolicyRefused):
    code = "policy_scheme_not_allowed"
    title = "The key's policy does not allow this signature scheme"


class PolicyDigestNotAllowed(PolicyRefused):
    code = "policy_digest_not_allowed"
    title = "The key's policy does not allow this digest algorithm"


class ClientIpNotAllowed(PolicyRefused):
    code = "client_ip_not_allowed"
    title = "The key's policy does not allow signing from this address"


class OutsideSigningWindow(PolicyRefused):
    code = "outside_signing_window"
    title = "The key's policy does not allow signing at this time"


class SelfApprovalForbidden(PermissionDenied):
    code = "self_approval_forbidden"
    title = "A requester cannot approve its own request"


class NotAnApprover(PermissionDenied):
    code = "not_an_approver"
    title = "You are not an approver for this key"


class PrivilegeEscalation(PermissionDenied):
    """Acting on another principal's credentials, or granting a role, beyond the
    caller's own reach: the target holds a role somewhere the caller does not."""

    code = "privilege_escalation"
    title = "This reaches beyond your own roles"


class SignerKeyAdminRequired(PrivilegeEscalation):
    """Adding a key to an account that a signing key's policy names as a signer
    would let the caller sign as it: key_admin on those keys is required."""

    code = "signer_key_admin_required"
    title = "A key's policy names this account as a signer; key_admin on that key is required"


class SubjectNotAllowed(PermissionDenied):
    """A certificate subject outside the subject policy of the key's TSG (or of a
    TSG above it): the built-in CA does not certify it."""

    code = "subject_not_allowed"
    title = "The certificate subject is outside the TSG's subject policy"


class SubjectPolicyMissing(SubjectNotAllowed):
    """No subject policy on the TSG's path: outside the root TSG, the built-in CA
    certifies only subjects a root superuser has allowed."""

    code = "subject_policy_missing"
    title = "No subject policy allows built-in CA certificates in this TSG"


class NotFound(SigneryError):
    code = "not_found"
    kind = ErrorKind.NOT_FOUND
    title = "Not found"


class TsgNotFound(NotFound):
    code = "tsg_not_found"
    title = "TSG not found"


class KeyNotFound(NotFound):
    code = "key_not_found"
    title = "Signing key not found"


class AccountNotFound(NotFound):
    code = "account_not_found"
    title = "Account not found"


class UserNotFound(NotFound):
    code = "user_not_found"
    title = "User not found"


class ConnectorNotFound(NotFound):
    code = "ca_connector_not_found"
    title = "CA connector not found"


class CertificateNotFound(NotFound):
    code = "certificate_not_found"
    title = "No such certificate"


class NoCertificateRequest(NotFound):
    code = "certificate_request_not_found"
    title = "The key has no such certificate request"


class SubjectPolicyNotFound(NotFound):
    code = "subject_policy_not_found"
    title = "The TSG has no subject policy of its own"


class KeyVersionNotFound(NotFound):
    code = "key_version_not_found"
    title = "The key has no such version"


class ApprovalRequestNotFound(NotFound):
    code = "approval_request_not_found"
    title = "No such signing request"


class GrantNotFound(NotFound):
    code = "grant_not_found"
    title = "No such signing grant"


class AccountKeyNotFound(NotFound):
    code = "account_key_not_found"
    title = "The account has no such public key"


class ApiTokenNotFound(NotFound):
    code = "api_token_not_found"
    title = "API token not found"


class RoleBindingNotFound(NotFound):
    code = "role_binding_not_found"
    title = "Role binding not found"


class TsaDisabled(NotFound):
    code = "tsa_disabled"
    title = "This server's time-stamping authority is disabled (tsa_access)"


class Conflict(SigneryError):
    code = "conflict"
    kind = ErrorKind.CONFLICT
    title = "Conflict"


class NameTaken(Conflict):
    code = "name_taken"
    title = "Name already in use"


class KeyDisabled(Conflict):
    code = "key_disabled"
    title = "Signing key is disabled"


class KeyNotActive(Conflict):
    code = "key_not_active"
    title = "Signing key is not active"


class KeyNameAmbiguous(Conflict):
    code = "key_name_ambiguous"
    title = "Several visible keys have this name; use the key id"


class CertificateExpired(Conflict):
    code = "certificate_expired"
    title = "The key's certificate has expired; renew it"


class CertificateRevoked(Conflict):
    code = "certificate_revoked"
    title = "The key's certificate is revoked; renew or reissue it"


class AlreadyInitialized(Conflict):
    code = "already_initialized"
    title = "Signery is already initialized"


class ConnectorRequiresHardwareKey(Conflict):
    code = "connector_requires_hardware_key"
    title = "A public CA connector may only be used by keys in a hardware key store"


class ConnectorInUse(Conflict):
    code = "ca_connector_in_use"
    title = "The CA connector is used by signing keys"


class NoPendingRequest(Conflict):
    code = "no_pending_certificate_request"
    title = "The key has no pending certificate request"


class KeyDestroyed(Conflict):
    code = "key_destroyed"
    title = "The signing key is destroyed"


class KeyDestructionScheduled(Conflict):
    code = "key_destruction_scheduled"
    title = "The key is scheduled for destruction; cancel that first"


class KeyVersionNotAllowed(Conflict):
    code = "key_version_not_allowed"
    title = "This key version may not sign (archived, below min_signing_version)"


class KeyNotYetValid(Conflict):
    code = "key_not_yet_valid"
    title = "The key's policy does not allow signing before valid_from"


class KeyValidityEnded(Conflict):
    code = "key_validity_ended"
    title = "The key's policy does not allow signing after valid_until"


class UsageLimitReached(Conflict):
    code = "usage_limit_reached"
    title = "The key's total signature limit is reached"


class KeyChangedConcurrently(Conflict):
    code = "key_changed_concurrently"
    title = "The key changed while this operation ran; try again"


class RotationPending(Conflict):
    code = "rotation_pending"
    title = "The key's rotation waits for the new version's certificate"


class ApprovalClosed(Conflict):
    code = "approval_request_closed"
    title = "The signing request is no longer pending"


class AlreadyDecided(Conflict):
    code = "approval_already_decided"
    title = "You already decided on this request"


class LastAccountKey(Conflict):
    code = "last_account_key"
    title = "An account keeps at least one public key"


class DestroyNotCancellable(Conflict):
    code = "destroy_not_cancellable"
    title = "This key store cannot cancel a destruction"


class TsaAlreadyProvisioned(Conflict):
    """Another worker made the TSA first (the unique ``role``): use theirs."""

    code = "tsa_already_provisioned"
    title = "The time-stamping authority already exists"


class ApprovalRequestChanged(Conflict):
    code = "approval_request_changed"
    title = "The signing request lists other digests than you reviewed; read it again"


class KeyNameShadows(Conflict):
    code = "key_name_shadows"
    title = (
        "A key of this name here would take the place of a deeper key that accounts "
        "above resolve this name to; choose another name"
    )


# ----------------------------------------------------------------- 413 / 415


class RequestTooLarge(SigneryError):
    code = "request_too_large"
    kind = ErrorKind.TOO_LARGE
    title = "Request body too large"


class UnsupportedMediaType(SigneryError):
    code = "unsupported_media_type"
    kind = ErrorKind.UNSUPPORTED_MEDIA_TYPE
    title = "Unsupported media type"


# ----------------------------------------------------------------- 429


class RateLimited(SigneryError):
    """A rate limit refused the request; ``retry_after`` (seconds) says when to try again."""

    code = "rate_limited"
    kind = ErrorKind.TOO_MANY_REQUESTS
    title = "Too many requests"


class DailyLimitReached(RateLimited):
    """The key's per-day limit is reached; ``retry_after`` is the start of the next day."""

    code = "daily_limit_reached"
    title = "The key's daily signature limit is reached"


class TooManyFailedAttempts(RateLimited):
    """Too many failed sign-ins from this address or for this username (passwords),
    or too many refused assertions from this address (token endpoint), in the
    current window; ``retry_after`` is when the window ends."""

    code = "too_many_failed_attempts"
    title = "Too many failed attempts"


class PasswordChecksBusy(RateLimited):
    """Every password verification slot of the server stayed taken for longer than
    it waits: try again after ``retry_after`` seconds."""

    code = "password_checks_busy"
    title = "Too many password checks at once"


# ----------------------------------------------------------------- 5xx


class Unavailable(SigneryError):
    code = "unavailable"
    kind = ErrorKind.UNAVAILABLE
    title = "Service unavailable"


class AuditUnavailable(Unavailable):
    code = "audit_unavailable"
    title = "The audit record could not be committed; nothing was signed"


class DatabaseUnavailable(Unavailable):
    code = "database_unavailable"
    title = "Database unavailable"


class DatabaseError(SigneryError):
    code = "database_error"
    title = "The database refused the operation"


class KeyStoreUnavailable(Unavailable):
    code = "keystore_unavailable"
    title = "Key store unavailable"


class ConnectorFailed(Unavailable):
    """The external CA could not be reached or refused the request (its answer is in
    the detail, never a credential)."""

    code = "ca_connector_failed"
    title = "The external CA did not issue the certificate"


class TsaUnavailable(Unavailable):
    code = "tsa_unavailable"
    title = "The time-stamping authority cannot issue timestamps"


class KeyStoreError(SigneryError):
    """A key store failed in a way that is not the caller's fault."""

    code = "keystore_error"
    title = "Key store error"


class KeyMaterialMissing(KeyStoreError):
    code = "key_material_missing"
    kind = ErrorKind.CONFLICT
    title = "Key material is missing or destroyed in its store"


class KeyStoreKeyDisabled(Conflict):
    code = "keystore_key_disabled"
    title = "The key is disabled in its key store"


class KeyStoreKeyPendingDeletion(Conflict):
    code = "keystore_key_pending_deletion"
    title = "The key is scheduled for deletion in its key store"


class KeyStoreAccessDenied(KeyStoreError):
    code = "keystore_access_denied"
    title = "The key store refused Signery's credentials for this operation"


class MasterKeyMismatch(KeyStoreError):
    code = "master_key_mismatch"
    title = "Ciphertext does not decrypt under this master key and context"


class SignatureVerificationFailed(KeyStoreError):
    code = "signature_self_check_failed"
    title = "The key store returned a signature that does not verify; nothing was returned"


class ConfigurationError(SigneryError):
    code = "configuration_error"
    title = "Configuration error"


class DataDirectoryNotPrivate(ConfigurationError):
    """The data directory (database, master key) is open to other users."""

    code = "data_directory_not_private"
    title = "The data directory is accessible by other users"


class PortInUse(ConfigurationError):
    """Another server (another installation, or anything else) listens on the port."""

    code = "port_in_use"
    title = "The port is already in use"


class ClientError(SigneryError):
    """Raised by the client for local problems (missing profile, unreadable file...)."""

    code = "client_error"
    kind = ErrorKind.INVALID_INPUT
    title = "Client error"


class Interrupted(ClientError):
    """The work was stopped (Ctrl-C, SIGTERM, ``Client.interrupt()``) before this
    file was signed: no request was sent after the interrupt and nothing was
    written; the detail says how far it got."""

    code = "interrupted"
    title = "Interrupted: not signed"


class SignatureInvalid(SigneryError):
    """A signature did not verify (client-side ``signery verify``)."""

    code = "signature_invalid"
    kind = ErrorKind.INVALID_INPUT
    title = "Signature does not verify"


def _all_error_classes() -> list[type[SigneryError]]:
    seen: list[type[SigneryError]] = []
    stack: list[type[SigneryError]] = [SigneryError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen


def error_class_for_code(code: str) -> type[SigneryError]:
    """The most specific error class whose stable code is ``code`` (client side mapping)."""
    for cls in _all_error_classes():
        if cls.__dict__.get("code") == code:
            return cls
    return SigneryError


def error_from_problem(problem: dict[str, Any]) -> SigneryError:
    """Rebuild a SigneryError from a problem+json document received over HTTP."""
    code = str(problem.get("code") or "internal_error")
    cls = error_class_for_code(code)
    err = cls(str(problem.get("detail") or problem.get("title") or code))
    err.code = code
    err.extra = {k: v for k, v in problem.items() if k not in {"detail", "title", "code"}}
    return err
