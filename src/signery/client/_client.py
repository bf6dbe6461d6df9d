"""The Signery HTTP client: signing plane for built-in accounts, REST for admins."""

from __future__ import annotations

import base64
import contextlib
import functools
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import BaseModel, TypeAdapter, ValidationError

from signery import __version__
from signery import protocol as p
from signery.client._management import (
    Accounts,
    Approvals,
    Audit,
    Ca,
    CaConnectors,
    Grants,
    KeyStores,
    Roles,
    SigningKeys,
    Tsgs,
    Users,
)
from signery.client._signer import RemoteSigner
from signery.crypto import Hashed
from signery.endpoints import Endpoint
from signery.errors import (
    ClientError,
    Interrupted,
    SigneryError,
    ValidationFailed,
    error_from_problem,
)

M = TypeVar("M")

ASSERTION_LIFETIME_SECONDS = 60  # well under the server's 5-minute maximum
TOKEN_REFRESH_MARGIN_SECONDS = 60
DEFAULT_TIMEOUT = 30.0
USER_AGENT = f"signery-client/{__version__}"


class ServerUnreachable(ClientError):
    code = "server_unreachable"
    title = "Cannot reach the Signery server"


class UnexpectedResponse(ClientError):
    code = "unexpected_response"
    title = "The server's answer was not understood"


class ApprovalPending(ClientError):
    """The key requires approval: the server answered 202 with a signing request.

    ``pending`` is the request (id, status, approvals so far); wait with
    :meth:`Client.wait_for_approval`, then sign again."""

    code = "approval_pending"
    title = "Signing waits for approval"

    pending: p.SigningPending | None = None

    @classmethod
    def of(cls, pending: p.SigningPending) -> ApprovalPending:
        error = cls(
            f"signing with {pending.key_name} needs approval: request {pending.request_id} "
            f"is {pending.status.value} ({pending.approvals}/{pending.required_approvals} "
            "approvals)",
            request_id=pending.request_id,
            status=pending.status.value,
        )
        error.pending = pending
        return error

    @property
    def request_id(self) -> str:
        return str(self.extra.get("request_id", ""))


class ApprovalDenied(ClientError):
    """An approver denied the signing request (the comment says why)."""

    code = "approval_denied"
    title = "The signing request was denied"


class ApprovalExpired(ClientError):
    """The signing request expired (or was cancelled) before it was approved."""

    code = "approval_expired"
    title = "The signing request expired before approval"


DEFAULT_APPROVAL_POLL_SECONDS = 5.0


AccountPrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def load_account_key(path: Path) -> AccountPrivateKey:
    """Load an account's private key file (PEM, PKCS#8 or traditional, unencrypted)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read key file {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ClientError(f"{path} is not an unencrypted PEM private key") from e
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ClientError(f"{path}: {type(key).__name__} keys cannot authenticate")
    return key


def assertion_algorithm(key: AccountPrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "PS256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[key.curve.name]


@dataclass(frozen=True)
class AccountCredentials:
    """A built-in account: its client id and private key (kept on the build machine)."""

    client_id: str
    private_key: AccountPrivateKey

    @classmethod
    def from_key_file(cls, client_id: str, key_file: Path) -> AccountCredentials:
        try:
            uuid.UUID(client_id)
        except ValueError:
            raise ClientError("client id must be a UUID") from None
        return cls(client_id, load_account_key(key_file))

    def assertion(self, audience: str, now: float | None = None) -> str:
        """An RFC 7523 assertion: iss = sub = client id, aud = the server's issuer."""
        issued = int(now if now is not None else time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME_SECONDS,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(claims, self.private_key, algorithm=assertion_algorithm(self.private_key))


class Client:
    """Talks to one Signery server.

    ``credentials`` (a built-in account) authenticate the signing plane;
    ``api_token`` (a user's personal token) authenticates management calls.
    ``interrupted``, once set (by :meth:`interrupt`, a signal handler or another
    thread), stops the client: no request is sent after it, and a signature that
    arrives after it is discarded (:class:`~signery.errors.Interrupted`).
    """

    def __init__(
        self,
        server: str,
        *,
        credentials: AccountCredentials | None = None,
        api_token: str | None = None,
        verify: bool | str = True,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        interrupted: threading.Event | None = None,
    ) -> None:
        if not server.startswith(("http://", "https://")):
            raise ClientError("the server URL must start with https:// (or http:// for local use)")
        self.server = server.rstrip("/")
        self._credentials = credentials
        self._api_token = api_token
        self._http = httpx.Client(
            base_url=self.server,
            verify=verify,
            timeout=timeout,
            headers={"User-Agent": USER_AGENT},
            transport=transport,
        )
        self._access_token: str | None = None
        self._access_expires = 0.0
        self._issuer: str | None = None
        self._lock = threading.Lock()
        self._interrupted = interrupted if interrupted is not None else threading.Event()
        # The management plane (``api_token``): one typed sub-client per noun.
        self.tsgs = Tsgs(self)
        self.users = Users(self)
        self.roles = Roles(self)
        self.accounts = Accounts(self)
        self.signing_keys = SigningKeys(self)
        self.ca = Ca(self)
        self.ca_connectors = CaConnectors(self)
        self.keystores = KeyStores(self)
        self.approvals = Approvals(self)
        self.grants = Grants(self)
        self.audit = Audit(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def client_id(self) -> str | None:
        """The built-in account this client signs as (None without credentials)."""
        return self._credentials.client_id if self._credentials is not None else None

    @property
    def interrupted(self) -> threading.Event:
        """The event that stops this client once set (:meth:`interrupt` sets it):
        hand it to the formats (``SignOptions.interrupted``) so that a file being
        hashed stops too."""
        return self._interrupted

    def interrupt(self) -> None:
        """Stop: no request is sent from now on (each call raises Interrupted).
        A request already on its way completes on the server; if it was a
        signing, its signature is discarded rather than returned. Safe from any
        thread and from a signal handler."""
        self._interrupted.set()

    # ------------------------------------------------------------ discovery and tokens

    def metadata(self) -> p.ServerMetadata:
        return self._parse(p.ServerMetadata, self._send("GET", f"{p.API_PREFIX}/meta", auth=None))

    def access_token(self, *, refresh: bool = False) -> str:
        """A valid access token for the account, fetched again shortly before expiry."""
        if self._credentials is None:
            raise ClientError(
                "no account credentials: run `signery login --client-id ... --key-file ...`"
            )
        with self._lock:
            if refresh or self._access_token is None or time.time() > self._access_expires:
                if self._issuer is None:
                    self._issuer = self.metadata().issuer
                assertion = self._credentials.assertion(self._issuer)
                response = self._send(
                    "POST",
                    f"{p.API_PREFIX}/oauth/token",
                    auth=None,
                    data={"grant_type": p.JWT_BEARER_GRANT, "assertion": assertion},
                )
                token = self._parse(p.TokenResponse, response)
                self._access_token = token.access_token
                self._access_expires = time.time() + token.expires_in - TOKEN_REFRESH_MARGIN_SECONDS
            return self._access_token

    # ------------------------------------------------------------ signing plane

    def keys(self, *, everything: bool = False) -> list[p.SigningKeySummary]:
        """Keys this account can sign with now; with ``everything``, every key it can
        see, the others marked ``usable=False`` with an ``unusable_reason``."""
        params = {"all": "true"} if everything else None
        return self._parse(
            list[p.SigningKeySummary],
            self._signing("GET", f"{p.API_PREFIX}/signing/keys", params=params),
        )

    def key(self, name: str, *, usable: bool = True) -> p.SigningKeySummary:
        """The key a name (or id) means for this account, resolved as the server
        does: the nearest key, keys at the same distance being ambiguous. With
        ``usable`` (to sign), a key the account cannot sign with now is refused
        here with the server's reason, before anything is hashed or sent; without
        (to verify), its public keys are returned all the same."""
        listed = self.keys(everything=True)
        matches = [k for k in listed if k.id == name] or [k for k in listed if k.name == name]
        if matches:
            # Older servers send no distance: every match is then as near.
            best = min(k.distance or 0 for k in matches)
            matches = [k for k in matches if (k.distance or 0) == best]
        if not matches:
            raise error_from_problem(
                {"code": "key_not_found", "detail": f"no key named {name!r} is visible"}
            )
        if len(matches) > 1:
            raise error_from_problem(
                {
                    "code": "key_name_ambiguous",
                    "detail": f"several keys named {name!r} are as near; use the key id",
                    "candidates": [{"id": k.id, "tsg_id": k.tsg_id} for k in matches],
                }
            )
        found = matches[0]
        if usable and not found.usable:
            reason = found.unusable_reason or "key_not_active"
            raise error_from_problem(
                {"code": reason, "detail": f"key {found.name!r} cannot sign for you: {reason}"}
            )
        return found

    def sign(
        self,
        key: str,
        hashed: Hashed,
        scheme: p.SignatureScheme,
        *,
        client_info: p.ClientInfo | None = None,
        justification: str | None = None,
        key_version: int | None = None,
    ) -> p.SignResponse:
        """Send a digest, get a signature (already verified by the server).

        ``key_version`` pins the version whose public key the caller holds (a
        rotated key then refuses instead of signing with a key it did not read).

        Only the server knows the key behind a bare reference, so it is the one
        that checks ``scheme`` against it; :class:`RemoteSigner` knows the key's
        algorithm and refuses a scheme that does not fit before sending.

        Raises :class:`ApprovalPending` when the key requires approval and the
        account holds no valid grant (HTTP 202)."""
        try:
            request = p.SignRequest(
                digest=base64.b64encode(hashed.digest).decode("ascii"),
                digest_algorithm=hashed.algorithm.value,
                scheme=scheme.value,
                client=client_info,
                justification=justification,
                key_version=key_version,
            )
        except ValidationError as e:
            # What the server would answer (a justification too long, a control
            # character), said before anything is sent; the value is not repeated.
            raise ValidationFailed(_refusal(e)) from None
        path = f"{p.API_PREFIX}/signing/keys/{_segment(key)}/sign"
        response = self._signing(
            "POST", path, json=request.model_dump(mode="json", exclude_none=True)
        )
        if self._interrupted.is_set():
            # The request left before the interrupt: the server signed (and
            # recorded it), but whoever interrupted wants nothing written now.
            raise Interrupted(
                "stopped while the server signed this digest; the signature was discarded"
            )
        if response.status_code == 202:
            raise ApprovalPending.of(self._parse(p.SigningPending, response))
        return self._parse(p.SignResponse, response)

    def signing_request(self, request_id: str) -> p.SigningPending:
        """The state of a signing request made for this account (after a 202)."""
        path = f"{p.API_PREFIX}/signing/requests/{_segment(request_id)}"
        return self._parse(p.SigningPending, self._signing("GET", path))

    def wait_for_approval(
        self,
        request_id: str,
        timeout: float,
        interval: float = DEFAULT_APPROVAL_POLL_SECONDS,
    ) -> p.SigningPending:
        """Poll a signing request until it is decided or ``timeout`` seconds pass;
        the last state seen (still ``pending_approval`` when the time ran out)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.signing_request(request_id)
            left = deadline - time.monotonic()
            if state.status is not p.ApprovalStatus.PENDING_APPROVAL or left <= 0:
                return state
            if self._interrupted.wait(min(interval, left)):
                raise Interrupted(f"stopped while waiting for signing request {request_id}")

    def signer(
        self,
        key: str,
        *,
        client_info: p.ClientInfo | None = None,
        justification: str | None = None,
    ) -> RemoteSigner:
        """The key ``key`` as formats see it (:meth:`key` resolves it first, so a
        key this account cannot sign with is refused here, before any hashing)."""
        return RemoteSigner.from_summary(
            self, self.key(key), client_info=client_info, justification=justification
        )

    # ------------------------------------------------------------ management plane

    def call(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> M:
        """A management API call with the user's API token (or Basic ``auth``), on a
        path spelled by the caller: prefer the typed sub-clients (``client.signing_keys``...),
        whose paths are named once in ``signery.endpoints``."""
        response = self._management(method, path, json=json, params=params, basic=auth)
        return self._parse(model, response)

    # The typed sub-clients (signery.client._management) call these three.

    def _api(
        self,
        endpoint: Endpoint,
        model: type[M],
        *,
        segments: Mapping[str, str] | None = None,
        body: BaseModel | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> M:
        """A management call on a named endpoint, its answer parsed into ``model``.
        The body is sent as the fields its maker set."""
        json = body.model_dump(mode="json", exclude_unset=True) if body is not None else None
        path = endpoint.path(**(segments or {}))
        return self._parse(model, self._management(endpoint.method, path, json=json, params=params))

    def _api_raw(
        self,
        endpoint: Endpoint,
        *,
        segments: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> bytes:
        """A management call whose answer is not JSON (PEM, DER) or empty (204)."""
        path = endpoint.path(**(segments or {}))
        return self._management(endpoint.method, path, params=params).content

    @contextlib.contextmanager
    def _api_stream(
        self, endpoint: Endpoint, *, params: Mapping[str, Any] | None = None
    ) -> Iterator[Iterator[bytes]]:
        """A GET whose answer is read as it arrives (an audit export): the body's
        chunks, never held whole in memory. An error answer raises as usual; a
        stream cut short raises ServerUnreachable."""
        if not self._api_token:
            raise ClientError(
                "no API token: run `signery login --api-token ...` or set SIGNERY_API_TOKEN"
            )
        self._check_interrupted()
        path = endpoint.path()
        request = self._http.build_request(
            endpoint.method,
            path,
            params={k: v for k, v in (params or {}).items() if v is not None},
            headers={"Authorization": f"Bearer {self._api_token}"},
        )
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as e:
            raise ServerUnreachable(f"cannot reach {self.server}: {type(e).__name__}") from None
        try:
            if not response.is_success:
                response.read()
                self._raise_for(response, path)
            yield self._chunks(response)
        finally:
            response.close()

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()
        except httpx.TransportError as e:
            raise ServerUnreachable(
                f"the answer of {self.server} was cut short: {type(e).__name__}"
            ) from None

    # ------------------------------------------------------------ plumbing

    def _management(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        basic: tuple[str, str] | None = None,
    ) -> httpx.Response:
        if basic is not None:
            raw = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode("ascii")
            return self._send(method, path, auth=f"Basic {raw}", json=json, params=params)
        if not self._api_token:
            raise ClientError(
                "no API token: run `signery login --api-token ...` or set SIGNERY_API_TOKEN"
            )
        return self._send(method, path, auth=f"Bearer {self._api_token}", json=json, params=params)

    def _signing(
        self, method: str, path: str, json: Any = None, params: Mapping[str, Any] | None = None
    ) -> httpx.Response:
        try:
            return self._send(
                method, path, auth=f"Bearer {self.access_token()}", json=json, params=params
            )
        except SigneryError as e:
            if e.code != "invalid_token":
                raise
        # The token may have been revoked by a server restart with a new key: retry once.
        return self._send(
            method, path, auth=f"Bearer {self.access_token(refresh=True)}", json=json, params=params
        )

    def _send(
        self,
        method: str,
        path: str,
        *,
        auth: str | None,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        self._check_interrupted()
        headers = {"Authorization": auth} if auth else {}
        try:
            response = self._http.request(
                method,
                path,
                json=json,
                data=data,
                params={k: v for k, v in (params or {}).items() if v is not None},
                headers=headers,
            )
        except httpx.TransportError as e:
            raise ServerUnreachable(f"cannot reach {self.server}: {type(e).__name__}") from None
        if not response.is_success:
            self._raise_for(response, path)
        return response

    def _check_interrupted(self) -> None:
        # Checked right before each request leaves: after an interrupt nothing
        # more reaches the server (a signing request above all).
        if self._interrupted.is_set():
            raise Interrupted("stopped; no request was sent")

    def _raise_for(self, response: httpx.Response, path: str) -> NoReturn:
        try:
            problem = response.json()
        except ValueError:
            problem = None
        if isinstance(problem, dict) and "code" in problem:
            raise error_from_problem(problem)
        raise UnexpectedResponse(f"HTTP {response.status_code} from {self.server}{path}")

    @staticmethod
    def _parse(model: type[M], response: httpx.Response) -> M:
        try:
            adapter: TypeAdapter[M] = _adapter(model)  # type: ignore[arg-type]
            return adapter.validate_json(response.content)
        except ValidationError as e:
            raise UnexpectedResponse(
                f"the server's answer did not match {model}: {e.error_count()} errors"
            ) from None


@functools.cache
def _adapter(model: Any) -> TypeAdapter[Any]:
    return TypeAdapter(model)


def _refusal(error: ValidationError) -> str:
    """A request model's refusal as the server words it: field locations and
    messages, never the input (it may be a secret)."""
    return "; ".join(
        f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
    )[:1000]


def _segment(value: str) -> str:
    """A URL path segment: refuse anything that could change the path."""
    if not value or any(c in value for c in "/?#%\\") or value in (".", ".."):
        raise ClientError(f"invalid key reference {value!r}")
    return value
