"""AWS KMS key store (name and kind ``aws-kms``): private keys never leave AWS KMS.

Each key version is one asymmetric KMS key: ``CreateKey`` with
``KeyUsage=SIGN_VERIFY`` and the key spec of the Signery algorithm (RSA_2048/3072/
4096, ECC_NIST_P256/P384/P521), key material generated inside KMS
(``Origin=AWS_KMS``), single-Region. The key is created with tags naming the TSG,
the Signery key id, name and version, and gets an alias under
``settings.alias_prefix`` so that operators recognise it in the AWS console.

Signing sends only the digest: ``Sign`` with ``MessageType=DIGEST`` (AWS KMS API
reference, Sign), never ``RAW``, so KMS cannot hash a second time and Signery never
ships artifacts to AWS. KMS ties the hash to the curve (P-384 signs only SHA-384
digests, P-521 only SHA-512): :meth:`AwsKmsKeyStore.digests_for` says so, and the
base class refuses other pairs before any call to KMS.

A key's handle names the KMS key id. Before the first signing with a handle, the
store reads the KMS key's tags and refuses to sign unless they name the same
Signery key, version and TSG as the handle: a key reference copied into another
key's database row does not sign under that other key's identity (the built-in
store gets the same property from its AES-GCM associated data).

``destroy`` schedules the deletion (``ScheduleKeyDeletion``, waiting period
``deletion_window_days``) and deletes the alias; ``cancel_destroy`` cancels it and
re-enables the key. Until the waiting period ends KMS refuses to sign
(``keystore_key_pending_deletion``).

Failures become Signery errors in this module only; no botocore exception and no
AWS error message escapes (AWS messages quote ARNs and principals), only the AWS
error code. Throttling and timeouts are retried by botocore ("standard" retry mode,
exponential backoff with jitter) up to ``max_attempts`` tries, then answered 503.
A retried CreateKey whose first answer was lost can leave a KMS key that Signery
never recorded; it carries the tags, so ``signery:key-id`` finds it.

``open_store`` makes no network call: an unreachable endpoint does not stop the
server from starting; ``health()`` reports it and key operations fail with a clear
503. Clients are created on first use.

IAM permissions the credentials need: kms:CreateKey, kms:TagResource (tags given
to CreateKey), kms:CreateAlias, kms:GetPublicKey, kms:Sign, kms:ListResourceTags,
kms:DescribeKey, kms:ScheduleKeyDeletion, kms:CancelKeyDeletion, kms:EnableKey,
kms:ListAliases, kms:DeleteAlias, and kms:ListKeys (health).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3.session  # type: ignore[import-untyped]
import botocore.config  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]
import botocore.utils  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signery import __version__
from signery.cache import BoundedCache
from signery.crypto import Hashed, PublicKey, algorithm_of_public_key
from signery.errors import (
    ConfigurationError,
    KeyMaterialMissing,
    KeyStoreAccessDenied,
    KeyStoreError,
    KeyStoreKeyDisabled,
    KeyStoreKeyPendingDeletion,
    KeyStoreUnavailable,
    SigneryError,
    UnsupportedAlgorithm,
)
from signery.keystores._base import (
    CancellableKeyStore,
    GeneratedKey,
    HealthCheckedKeyStore,
    KeyContext,
    KeyHandle,
    StoreHealth,
)
from signery.keystores._settings import AwsKmsSettings
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme

__all__ = [
    "AwsKmsKeyStore",
    "KeyStoreAccessDenied",
    "KeyStoreKeyDisabled",
    "KeyStoreKeyPendingDeletion",
    "open_store",
]

log = logging.getLogger("signery.keystores.aws_kms")

KIND = "aws-kms"

# AWS KMS API reference, CreateKey: KeySpec.
KEY_SPECS: dict[Algorithm, str] = {
    Algorithm.RSA_2048: "RSA_2048",
    Algorithm.RSA_3072: "RSA_3072",
    Algorithm.RSA_4096: "RSA_4096",
    Algorithm.EC_P256: "ECC_NIST_P256",
    Algorithm.EC_P384: "ECC_NIST_P384",
    Algorithm.EC_P521: "ECC_NIST_P521",
}
_ALL_DIGESTS = (DigestAlgorithm.SHA256, DigestAlgorithm.SHA384, DigestAlgorithm.SHA512)
# AWS KMS developer guide, "Key spec reference": ECC_NIST_P256 signs with
# ECDSA_SHA_256 only, P384 with ECDSA_SHA_384 only, P521 with ECDSA_SHA_512 only;
# RSA keys sign with SHA-256, SHA-384 and SHA-512.
DIGESTS: dict[Algorithm, tuple[DigestAlgorithm, ...]] = {
    Algorithm.RSA_2048: _ALL_DIGESTS,
    Algorithm.RSA_3072: _ALL_DIGESTS,
    Algorithm.RSA_4096: _ALL_DIGESTS,
    Algorithm.EC_P256: (DigestAlgorithm.SHA256,),
    Algorithm.EC_P384: (DigestAlgorithm.SHA384,),
    Algorithm.EC_P521: (DigestAlgorithm.SHA512,),
}
# AWS KMS API reference, Sign: SigningAlgorithm. KMS's RSASSA_PSS uses MGF1 with
# the same hash and a salt as long as the digest, which is what
# signery.crypto.signature_padding verifies.
_SCHEME_PREFIX = {
    SignatureScheme.RSA_PKCS1V15: "RSASSA_PKCS1_V1_5_SHA_",
    SignatureScheme.RSA_PSS: "RSASSA_PSS_SHA_",
    SignatureScheme.ECDSA: "ECDSA_SHA_",
}
_DIGEST_SUFFIX = {
    DigestAlgorithm.SHA256: "256",
    DigestAlgorithm.SHA384: "384",
    DigestAlgorithm.SHA512: "512",
}
SIGNING_ALGORITHMS: dict[tuple[SignatureScheme, DigestAlgorithm], str] = {
    (scheme, digest): prefix + suffix
    for scheme, prefix in _SCHEME_PREFIX.items()
    for digest, suffix in _DIGEST_SUFFIX.items()
}

TAG_TSG = "signery:tsg"
TAG_KEY_ID = "signery:key-id"
TAG_KEY_NAME = "signery:key-name"
TAG_KEY_VERSION = "signery:key-version"
# AWS KMS API reference, Tag: TagValue is 0-256 characters; AWS tag values may
# hold letters, digits, spaces and _ . : / = + - @ (anything else is replaced).
TAG_VALUE_MAX = 256
_TAG_UNSAFE = re.compile(r"[^\w .:/=+\-@]")
# AWS KMS API reference, CreateAlias: AliasName is 1-256 characters of
# [a-zA-Z0-9/_-], begins with "alias/", and "alias/aws/" is reserved for AWS.
ALIAS_MAX = 256
RESERVED_ALIAS_PREFIX = "alias/aws/"
_ALIAS_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]+")
# Random hex digits of the Signery key id (a UUID4) in the alias: key names are
# unique per TSG only, the id makes the alias unique (48 random bits).
ALIAS_ID_CHARS = 12

PUBLIC_KEY_CACHE_SIZE = 4096
BOUND_CACHE_SIZE = 4096
# Signing runs in anyio worker threads (40 by default): a pool as large lets each
# of them hold a connection instead of opening and discarding one per call.
MAX_POOL_CONNECTIONS = 40
# /readyz asks every store for its health on every probe: a short-timeout, single
# try, remembered for a few seconds so that probes do not spend the KMS quota.
HEALTH_CONNECT_TIMEOUT = 1.0
HEALTH_READ_TIMEOUT = 2.0
HEALTH_CACHE_SECONDS = 5.0
# Suggested wait (seconds, problem member "retry_after") after KMS throttled us.
THROTTLED_RETRY_AFTER = 2

_THROTTLING = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "LimitExceededException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)
_TRANSIENT = frozenset(
    {
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_CREDENTIALS_REJECTED = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "MissingAuthenticationToken",
    }
)
# Key states in which KMS refuses cryptographic operations for a while (custom key
# store disconnected, multi-Region key being created or updated).
_TRANSIENT_STATES = frozenset({"Unavailable", "Creating", "Updating"})


# ---------------------------------------------------------------- configuration


def open_store(settings: AwsKmsSettings) -> AwsKmsKeyStore:
    """The ``aws-kms`` store for these settings, after every offline check.

    Raises one ConfigurationError for what can be known wrong without the network
    (endpoint URL, region name, alias prefix, missing profile); never calls AWS.
    """
    _check_endpoint(settings.endpoint_url)
    try:
        botocore.utils.validate_region_name(settings.region)
    except botocore.exceptions.InvalidRegionError:
        raise ConfigurationError(
            f"[aws_kms] region {settings.region[:64]!r} is not a valid AWS region name"
        ) from None
    prefix = _alias_prefix(settings)
    if prefix == "alias":
        raise ConfigurationError("[aws_kms] alias_prefix needs a name after 'alias/'")
    if f"{prefix}/".startswith(RESERVED_ALIAS_PREFIX):
        raise ConfigurationError(
            f"[aws_kms] alias_prefix must not start with {RESERVED_ALIAS_PREFIX!r}: "
            "AWS reserves it for AWS managed keys"
        )
    if settings.profile is not None and settings.access_key_id is not None:
        raise ConfigurationError(
            "[aws_kms] give either profile or access_key_id/secret_access_key, not both"
        )
    secret = settings.secret_access_key
    token = settings.session_token
    try:
        session = boto3.session.Session(
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            aws_session_token=token.get_secret_value() if token else None,
            profile_name=settings.profile,
            region_name=settings.region,
        )
    except botocore.exceptions.ProfileNotFound:
        raise ConfigurationError(
            f"[aws_kms] AWS profile {settings.profile!r} is not in the AWS config files"
        ) from None
    except botocore.exceptions.BotoCoreError as e:
        # e.g. ConfigParseError for a broken ~/.aws/config; the type says enough.
        raise ConfigurationError(
            f"[aws_kms] cannot read the AWS configuration: {type(e).__name__}"
        ) from None
    return AwsKmsKeyStore(settings, session)


def _alias_prefix(settings: AwsKmsSettings) -> str:
    # The settings pattern allows trailing and doubled slashes; aliases get one.
    return re.sub(r"/+", "/", settings.alias_prefix).rstrip("/")


def _check_endpoint(url: str | None) -> None:
    if url is None:
        return
    problem = "it must be http(s)://host[:port][/path]"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a malformed port
    except ValueError:
        raise ConfigurationError(f"[aws_kms] endpoint_url is malformed: {problem}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"[aws_kms] endpoint_url is malformed: {problem}")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and error messages: refuse them.
        raise ConfigurationError(
            "[aws_kms] endpoint_url must not contain a user name or password "
            "(give credentials as access_key_id/secret_access_key or via the AWS chain)"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"[aws_kms] endpoint_url is malformed: {problem}")
    if port == 0:
        raise ConfigurationError("[aws_kms] endpoint_url has port 0")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        # A development shortcut, named as such: SigV4 authenticates requests but
        # does not encrypt them, and responses (public keys, signatures) are not
        # authenticated at all without TLS.
        log.warning(
            "aws-kms endpoint_url uses plain HTTP to a non-loopback host: "
            "acceptable for a test double only, never for real AWS KMS"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- names and tags


def alias_name(prefix: str, context: KeyContext) -> str:
    """The KMS alias of a key version: ``<prefix>/<tsg>/<name>-v<version>-<id>``.

    Sanitized to the KMS alias alphabet and cut to its 256 characters; unique
    because it ends with random digits of the Signery key id and the version."""
    tsg = _ALIAS_UNSAFE.sub("-", context.tsg_id).strip("-") or "tsg"
    label = _ALIAS_UNSAFE.sub("-", context.label).strip("-") or "key"
    key_id = re.sub(r"[^a-zA-Z0-9]", "", context.key_id)[-ALIAS_ID_CHARS:] or "0"
    suffix = f"-v{context.version}-{key_id}"
    head = f"{prefix}/{tsg}/"
    room = max(ALIAS_MAX - len(head) - len(suffix), 1)
    return f"{head}{label[:room]}{suffix}"


def _tag_value(value: str) -> str:
    return _TAG_UNSAFE.sub("_", value)[:TAG_VALUE_MAX]


def key_tags(context: KeyContext) -> dict[str, str]:
    """The tags that bind a KMS key to one Signery key version."""
    return {
        TAG_TSG: _tag_value(context.tsg_id),
        TAG_KEY_ID: _tag_value(context.key_id),
        TAG_KEY_NAME: _tag_value(context.label),
        TAG_KEY_VERSION: str(context.version),
    }


def _identity_tags(context: KeyContext) -> dict[str, str]:
    # The label is a display name (not part of KeyContext equality): not checked.
    tags = key_tags(context)
    del tags[TAG_KEY_NAME]
    return tags


# ---------------------------------------------------------------- the store


class AwsKmsKeyStore(CancellableKeyStore, HealthCheckedKeyStore):
    kind = KIND
    supported_algorithms = frozenset(KEY_SPECS)

    def __init__(self, settings: AwsKmsSettings, session: Any, *, name: str = KIND) -> None:
        super().__init__(name)
        self._settings = settings
        self._alias_prefix = _alias_prefix(settings)
        self._session = session
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._public_keys: BoundedCache[str, PublicKey] = BoundedCache(PUBLIC_KEY_CACHE_SIZE)
        # (KMS key, context) pairs whose tags were checked: the value is always True.
        self._bound: BoundedCache[tuple[str, KeyContext], bool] = BoundedCache(BOUND_CACHE_SIZE)
        self._health_cache: tuple[float, StoreHealth] | None = None
        self._ops_config = botocore.config.Config(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            # botocore's "max_attempts" counts retries after the first try;
            # "total_max_attempts" counts tries, which is what the setting means.
            retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
            max_pool_connections=MAX_POOL_CONNECTIONS,
            user_agent_extra=f"signery/{__version__}",
        )
        self._health_config = botocore.config.Config(
            connect_timeout=min(settings.connect_timeout, HEALTH_CONNECT_TIMEOUT),
            read_timeout=min(settings.read_timeout, HEALTH_READ_TIMEOUT),
            retries={"mode": "standard", "total_max_attempts": 1},
            user_agent_extra=f"signery/{__version__}",
        )

    def __repr__(self) -> str:
        return f"AwsKmsKeyStore(name={self.name!r}, {self._where()})"

    def digests_for(self, algorithm: Algorithm) -> tuple[DigestAlgorithm, ...]:
        return DIGESTS.get(algorithm, ())

    def signs_inline(self, algorithm: Algorithm) -> bool:
        # A network round trip: never on the event loop.
        return False

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    # ------------------------------------------------------------ backend hooks

    def _generate(self, algorithm: Algorithm, context: KeyContext) -> GeneratedKey:
        kms = self._client()
        description = (
            f"Signery signing key {context.label or context.key_id} version "
            f"{context.version} (TSG {context.tsg_id})"
        )[:8192]
        with self._translated(None):
            created = kms.create_key(
                KeyUsage="SIGN_VERIFY",
                KeySpec=KEY_SPECS[algorithm],
                # Key material generated inside KMS's HSMs, never imported.
                Origin="AWS_KMS",
                # Single-Region: the private key exists in the configured region only.
                MultiRegion=False,
                Description=description,
                # Tags go with CreateKey, so a key is never left without them: if
                # tagging is refused, no key is created (API reference, CreateKey: Tags).
                Tags=[{"TagKey": k, "TagValue": v} for k, v in key_tags(context).items()],
            )
        ref = str(created["KeyMetadata"]["KeyId"])
        try:
            public_key = self._fetch_public_key(ref, algorithm)
            with self._translated(ref):
                kms.create_alias(AliasName=alias_name(self._alias_prefix, context), TargetKeyId=ref)
        except BaseException:
            # No half-created key: the new KMS key goes away again.
            self._discard(ref)
            raise
        self._bound.put((ref, context), True)
        return GeneratedKey(KeyHandle(self.name, ref, algorithm, context), public_key)

    def _sign(self, handle: KeyHandle, hashed: Hashed, scheme: SignatureScheme) -> bytes:
        self._check_bound(handle)
        signing_algorithm = SIGNING_ALGORITHMS[(scheme, hashed.algorithm)]
        with self._translated(handle.ref):
            answer = self._client().sign(
                KeyId=handle.ref,
                Message=hashed.digest,
                # The message is the digest; KMS signs it without hashing again.
                MessageType="DIGEST",
                SigningAlgorithm=signing_algorithm,
            )
        signature = answer.get("Signature")
        if not isinstance(signature, bytes) or not signature:
            raise KeyStoreError("AWS KMS answered Sign without a signature")
        if answer.get("SigningAlgorithm") not in (None, signing_algorithm):
            raise KeyStoreError("AWS KMS signed with another algorithm than requested")
        return signature

    def _public_key(self, handle: KeyHandle) -> PublicKey:
        cached = self._public_keys.get(handle.ref)
        if cached is not None:
            if algorithm_of_public_key(cached) is not handle.algorithm:
                raise KeyMaterialMissing("the AWS KMS key does not hold a key of this algorithm")
            return cached
        return self._fetch_public_key(handle.ref, handle.algorithm)

    def _destroy(self, handle: KeyHandle) -> None:
        self._forget(handle.ref)
        try:
            with self._translated(handle.ref):
                self._client().schedule_key_deletion(
                    KeyId=handle.ref, PendingWindowInDays=self._settings.deletion_window_days
                )
        except KeyMaterialMissing:
            return  # already deleted: nothing left to erase
        except KeyStoreKeyPendingDeletion:
            pass  # a repeated destroy: the deletion is already scheduled
        self._delete_aliases(handle.ref)

    def _cancel_destroy(self, handle: KeyHandle) -> None:
        kms = self._client()
        state = self._key_state(handle.ref)
        if state == "PendingDeletion":
            with self._translated(handle.ref):
                # API reference, CancelKeyDeletion: the key is Disabled afterwards.
                kms.cancel_key_deletion(KeyId=handle.ref)
                kms.enable_key(KeyId=handle.ref)
        elif state == "Disabled":
            # Not pending deletion but disabled: an operator's decision, not ours
            # to reverse. (Also where a cancel stops if EnableKey failed above.)
            raise KeyStoreKeyDisabled(
                "the AWS KMS key is disabled, not pending deletion; enable it in AWS KMS"
            )
        elif state != "Enabled":
            raise self._state_error(state)
        self._restore_alias(handle)

    def _health(self) -> StoreHealth:
        now = time.monotonic()
        with self._lock:
            cached = self._health_cache
        if cached is not None and now - cached[0] < HEALTH_CACHE_SECONDS:
            return cached[1]
        try:
            with self._translated(None, health=True):
                self._client(health=True).list_keys(Limit=1)
            health = StoreHealth(True, f"AWS KMS answers ({self._where()})")
        except SigneryError as e:
            health = StoreHealth(False, e.detail)
        with self._lock:
            self._health_cache = (time.monotonic(), health)
        return health

    # ------------------------------------------------------------ KMS calls

    def _client(self, *, health: bool = False) -> Any:
        """The botocore KMS client (thread-safe once made; the session is not)."""
        purpose = "health" if health else "ops"
        with self._lock:
            client = self._clients.get(purpose)
            if client is None:
                try:
                    client = self._session.client(
                        "kms",
                        region_name=self._settings.region,
                        endpoint_url=self._settings.endpoint_url,
                        config=self._health_config if health else self._ops_config,
                    )
                except (ValueError, botocore.exceptions.BotoCoreError) as e:
                    raise KeyStoreError(f"cannot make an AWS KMS client: {type(e).__name__}") from e
                self._clients[purpose] = client
            return client

    def _fetch_public_key(self, ref: str, algorithm: Algorithm) -> PublicKey:
        with self._translated(ref):
            answer = self._client().get_public_key(KeyId=ref)
        # moto omits KeySpec (real KMS returns both): fall back to the older name.
        spec = answer.get("KeySpec") or answer.get("CustomerMasterKeySpec")
        if answer.get("KeyUsage") != "SIGN_VERIFY" or spec != KEY_SPECS[algorithm]:
            raise KeyMaterialMissing(f"the AWS KMS key is not a {KEY_SPECS[algorithm]} signing key")
        loaded = serialization.load_der_public_key(answer["PublicKey"])
        if not isinstance(loaded, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise KeyMaterialMissing("the AWS KMS key is not an RSA or EC key")
        try:
            matches = algorithm_of_public_key(loaded) is algorithm
        except UnsupportedAlgorithm:
            matches = False
        if not matches:
            raise KeyMaterialMissing(f"the AWS KMS key does not hold a {algorithm.value} key")
        self._public_keys.put(ref, loaded)
        return loaded

    def _check_bound(self, handle: KeyHandle) -> None:
        """Refuse a KMS key whose tags name another Signery key, version or TSG."""
        bound = (handle.ref, handle.context)
        if self._bound.get(bound):
            return
        tags = self._tags(handle.ref)
        expected = _identity_tags(handle.context)
        if any(tags.get(k) != v for k, v in expected.items()):
            raise KeyMaterialMissing(
                "the AWS KMS key's tags name another Signery key, version or TSG; "
                "refusing to sign with it"
            )
        self._bound.put(bound, True)

    def _forget(self, ref: str) -> None:
        self._public_keys.pop(ref)
        self._bound.take(lambda bound, _: bound[0] == ref)

    def _tags(self, ref: str) -> dict[str, str]:
        kms = self._client()
        tags: dict[str, str] = {}
        params: dict[str, Any] = {"KeyId": ref}
        with self._translated(ref):
            while True:
                page = kms.list_resource_tags(**params)
                for tag in page.get("Tags") or []:
                    tags[str(tag["TagKey"])] = str(tag.get("TagValue", ""))
                if not page.get("Truncated") or not page.get("NextMarker"):
                    return tags
                params["Marker"] = page["NextMarker"]

    def _aliases(self, ref: str) -> list[str]:
        kms = self._client()
        ours = f"{self._alias_prefix}/"
        names: list[str] = []
        params: dict[str, Any] = {"KeyId": ref}
        with self._translated(ref):
            while True:
                page = kms.list_aliases(**params)
                names += [
                    str(a["AliasName"])
                    for a in page.get("Aliases") or []
                    if str(a.get("AliasName", "")).startswith(ours)
                ]
                if not page.get("Truncated") or not page.get("NextMarker"):
                    return names
                params["Marker"] = page["NextMarker"]

    def _delete_aliases(self, ref: str) -> None:
        """Delete this key's aliases under our prefix. The key is already scheduled
        for deletion, which is what matters: a failure here is logged, not raised."""
        try:
            for name in self._aliases(ref):
                with self._translated(ref):
                    self._client().delete_alias(AliasName=name)
        except SigneryError as e:
            log.warning(
                "aws-kms: KMS key %s is scheduled for deletion but its alias was not deleted (%s)",
                ref,
                e.code,
            )

    def _restore_alias(self, handle: KeyHandle) -> None:
        """Give a key whose deletion was cancelled its alias back (from its tags,
        since the handle may carry no label). A failure is logged, not raised:
        signing does not use the alias."""
        try:
            if self._aliases(handle.ref):
                return
            tags = self._tags(handle.ref)
            context = KeyContext(
                handle.context.key_id,
                handle.context.version,
                handle.context.tsg_id,
                label=tags.get(TAG_KEY_NAME, handle.context.label),
            )
            with self._translated(handle.ref):
                self._client().create_alias(
                    AliasName=alias_name(self._alias_prefix, context),
                    TargetKeyId=handle.ref,
                )
        except SigneryError as e:
            log.warning("aws-kms: KMS key %s is usable but has no alias (%s)", handle.ref, e.code)

    def _discard(self, ref: str) -> None:
        """Schedule the deletion of a key that could not be completed."""
        try:
            with self._translated(ref):
                self._client().schedule_key_deletion(
                    KeyId=ref, PendingWindowInDays=self._settings.deletion_window_days
                )
        except SigneryError as e:
            # The original failure is what the caller must see; the orphan is
            # findable by its tags (signery:key-id).
            log.error(
                "aws-kms: could not schedule the deletion of the incomplete KMS key %s (%s); "
                "delete it by hand",
                ref,
                e.code,
            )

    def _key_state(self, ref: str) -> str:
        with self._translated(ref, describe_state=False):
            answer = self._client().describe_key(KeyId=ref)
        return str(answer["KeyMetadata"].get("KeyState", "Unknown"))

    # ------------------------------------------------------------ error translation

    @contextlib.contextmanager
    def _translated(
        self, ref: str | None, *, health: bool = False, describe_state: bool = True
    ) -> Iterator[None]:
        """Turn botocore's exceptions into Signery errors (and nothing else escapes).

        Messages carry the AWS error code, the region and the endpoint, never an
        AWS message (it quotes ARNs and principals) nor a credential."""
        try:
            yield
        except botocore.exceptions.ClientError as e:
            raise self._client_error(e, ref, describe_state=describe_state) from e
        except (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.CredentialRetrievalError,
        ) as e:
            # botocore resolves credentials when it makes a client and keeps the
            # result: forget the clients so that credentials that appear later
            # (an instance role that was not reachable yet) are found.
            with self._lock:
                self._clients.clear()
            raise KeyStoreUnavailable(
                f"no usable AWS credentials for AWS KMS ({self._where()}): {type(e).__name__}"
            ) from e
        except (
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError,
        ) as e:
            attempts = 1 if health else self._settings.max_attempts
            raise KeyStoreUnavailable(
                f"AWS KMS did not answer in time ({self._where()}; {attempts} tries)"
            ) from e
        except (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectionError,
            botocore.exceptions.HTTPClientError,
        ) as e:
            raise KeyStoreUnavailable(
                f"AWS KMS is unreachable ({self._where()}): {type(e).__name__}"
            ) from e
        except botocore.exceptions.BotoCoreError as e:
            raise KeyStoreError(f"the AWS SDK failed: {type(e).__name__}") from e

    def _client_error(self, e: Any, ref: str | None, *, describe_state: bool) -> SigneryError:
        response = e.response if isinstance(getattr(e, "response", None), dict) else {}
        code = str(response.get("Error", {}).get("Code") or "Unknown")[:64]
        tries = int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0)) + 1
        if code == "DisabledException":
            return KeyStoreKeyDisabled("the AWS KMS key of this key version is disabled")
        if code == "KMSInvalidStateException":
            state = self._state_after_refusal(ref) if describe_state and ref else None
            return self._state_error(state)
        if code == "NotFoundException":
            return KeyMaterialMissing("the AWS KMS key of this key version does not exist")
        if code in _THROTTLING:
            return KeyStoreUnavailable(
                f"AWS KMS throttled the request ({code}) {tries} times; try again later",
                retry_after=THROTTLED_RETRY_AFTER,
            )
        if code in _TRANSIENT:
            return KeyStoreUnavailable(
                f"AWS KMS is temporarily unavailable ({code}, {self._where()})"
            )
        if code == "AccessDeniedException":
            return KeyStoreAccessDenied(
                "AWS KMS denied the operation (AccessDeniedException): check the key "
                "policy and the IAM policy of Signery's credentials"
            )
        if code in _CREDENTIALS_REJECTED:
            return KeyStoreAccessDenied(f"AWS rejected Signery's credentials ({code})")
        return KeyStoreError(f"AWS KMS refused the operation ({code})")

    def _state_after_refusal(self, ref: str) -> str | None:
        """Which state made KMS refuse (KMSInvalidStateException covers several)."""
        try:
            return self._key_state(ref)
        except SigneryError:
            return None

    def _state_error(self, state: str | None) -> SigneryError:
        if state == "PendingDeletion":
            return KeyStoreKeyPendingDeletion(
                "the AWS KMS key of this key version is scheduled for deletion"
            )
        if state == "Disabled":
            return KeyStoreKeyDisabled("the AWS KMS key of this key version is disabled")
        if state is not None and state in _TRANSIENT_STATES:
            return KeyStoreUnavailable(f"the AWS KMS key is {state.lower()} ({self._where()})")
        shown = re.sub(r"[^A-Za-z]", "", state or "")[:32] or "unknown"
        return KeyStoreError(f"the AWS KMS key is in state {shown} (KMSInvalidStateException)")

    def _where(self) -> str:
        """Region and endpoint for messages (the endpoint URL has no userinfo:
        open_store refuses one)."""
        endpoint = self._settings.endpoint_url
        if endpoint is None:
            # No lock: a dict read is atomic, and this runs inside error handlers.
            client = self._clients.get("ops") or self._clients.get("health")
            endpoint = str(client.meta.endpoint_url) if client is not None else "AWS default"
        return f"region {self._settings.region}, endpoint {endpoint}"


# ---------------------------------------------------------------- master key wrapping

MASTER_KEY_CONTEXT = {"signery:purpose": "master-key"}


class KmsKeyWrapper:
    """Wraps Signery's master key with an AWS KMS symmetric key (Encrypt/Decrypt),
    so that the master key file holds only ciphertext that KMS alone can open.

    The encryption context binds the ciphertext to its purpose (AWS KMS
    Developer Guide, "Encryption context"): KMS refuses to decrypt it for
    anything else, and CloudTrail logs each unwrap with that context."""

    def __init__(self, store: AwsKmsKeyStore) -> None:
        self._store = store

    def wrap(self, key_id: str, plaintext: bytes) -> bytes:
        client = self._store._client()
        try:
            with self._store._translated(None, describe_state=False):
                blob = client.encrypt(
                    KeyId=key_id, Plaintext=plaintext, EncryptionContext=MASTER_KEY_CONTEXT
                )
        except SigneryError as e:
            raise ConfigurationError(
                f"cannot wrap the master key with AWS KMS key {key_id}: {e.detail}"
            ) from e
        return bytes(blob["CiphertextBlob"])

    def unwrap(self, key_id: str, ciphertext: bytes) -> bytes:
        client = self._store._client()
        try:
            with self._store._translated(None, describe_state=False):
                out = client.decrypt(
                    KeyId=key_id, CiphertextBlob=ciphertext, EncryptionContext=MASTER_KEY_CONTEXT
                )
        except SigneryError as e:
            # Start-up stops here, with the reason: wrong key, no permission,
            # KMS unreachable... never a stack trace.
            raise ConfigurationError(
                f"cannot unwrap the master key with AWS KMS key {key_id}: {e.detail}"
            ) from e
        return bytes(out["Plaintext"])


def open_key_wrapper(settings: AwsKmsSettings) -> KmsKeyWrapper:
    return KmsKeyWrapper(open_store(settings))
