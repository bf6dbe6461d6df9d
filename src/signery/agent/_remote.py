"""The agent's way to the server: the signing API of ``signery.client``, its
answers turned into PKCS#11 return values.

Every signature goes through the normal signing endpoint (policy, approvals,
limits, audit); the agent adds the calling tool as client info. A key that
waits for approval is waited for up to ``approval_wait`` seconds and signed
once approved; otherwise the tool gets ``CKR_FUNCTION_REJECTED`` and the log
names the pending request, so someone can approve it and the tool run again.
"""

from __future__ import annotations

import logging
from typing import Final

from signery import __version__
from signery import protocol as p
from signery.agent._objects import KeyEntry
from signery.agent._peer import machine_name
from signery.agent._pkcs11 import CKR, Pkcs11Error
from signery.client import ApprovalPending, Client
from signery.crypto import Hashed
from signery.errors import Interrupted, SigneryError

log = logging.getLogger("signery.agent")

# Refusals that say the key cannot sign (now): the key list is fetched again.
_KEY_REFUSALS: Final = frozenset(
    {
        "key_not_found",
        "key_disabled",
        "key_not_active",
        "key_destroyed",
        "key_destruction_scheduled",
        "key_version_not_allowed",
        "key_version_not_found",
        "key_not_yet_valid",
        "key_validity_ended",
        "certificate_expired",
        "certificate_revoked",
        "signer_not_allowed",
        "rotation_pending",
    }
)
# The request itself was wrong (what the tool sent cannot be signed as asked).
_REQUEST_REFUSALS: Final = {
    "digest_length_mismatch": CKR.DATA_LEN_RANGE,
    "unsupported_scheme": CKR.MECHANISM_INVALID,
    "scheme_not_allowed": CKR.MECHANISM_INVALID,
    "policy_scheme_not_allowed": CKR.MECHANISM_INVALID,
    "unsupported_digest_algorithm": CKR.DATA_INVALID,
    "digest_not_allowed": CKR.DATA_INVALID,
    "policy_digest_not_allowed": CKR.DATA_INVALID,
}
# The server or the way to it failed: the tool may try again.
_DEVICE_FAILURES: Final = frozenset(
    {
        "server_unreachable",
        "unexpected_response",
        "unavailable",
        "audit_unavailable",
        "database_unavailable",
        "database_error",
        "keystore_unavailable",
        "keystore_error",
        "internal_error",
        "http_error",
    }
)


def return_value(error: SigneryError) -> CKR:
    """The PKCS#11 return value for a refusal of the server (or the client)."""
    if error.code in _KEY_REFUSALS:
        return CKR.KEY_FUNCTION_NOT_PERMITTED
    if error.code in _REQUEST_REFUSALS:
        return _REQUEST_REFUSALS[error.code]
    if error.code in _DEVICE_FAILURES:
        return CKR.DEVICE_ERROR
    if isinstance(error, Interrupted):
        return CKR.FUNCTION_CANCELED
    # Policy, limits, approvals, credentials: the server said no.
    return CKR.FUNCTION_REJECTED


class ClientSigning:
    """:class:`RemoteSigning` over a logged-in :class:`~signery.client.Client`."""

    def __init__(self, client: Client, *, approval_wait: float, poll_seconds: float = 2.0) -> None:
        self._client = client
        self._approval_wait = approval_wait
        self._poll_seconds = poll_seconds
        self._default_info = p.ClientInfo(
            machine=machine_name(), tool=f"signery-agent/{__version__}"
        )

    def keys(self) -> list[p.SigningKeySummary]:
        try:
            return self._client.keys()
        except SigneryError as e:
            log.error("cannot list the account's keys: %s (%s)", e, e.code)
            raise Pkcs11Error(return_value(e), str(e)) from None

    def sign(
        self, key: KeyEntry, hashed: Hashed, scheme: p.SignatureScheme, caller: p.ClientInfo | None
    ) -> bytes:
        info = caller or self._default_info
        try:
            try:
                return self._sign_once(key, hashed, scheme, info)
            except ApprovalPending as pending:
                self._wait(pending, key)
                return self._sign_once(key, hashed, scheme, info)
        except SigneryError as e:
            log.error("%s: signing with %s refused: %s (%s)", _who(info), key.name, e, e.code)
            raise Pkcs11Error(return_value(e), str(e)) from None

    def _sign_once(
        self, key: KeyEntry, hashed: Hashed, scheme: p.SignatureScheme, info: p.ClientInfo
    ) -> bytes:
        response = self._client.sign(
            key.id, hashed, scheme, client_info=info, key_version=key.version
        )
        return response.signature

    def _wait(self, pending: ApprovalPending, key: KeyEntry) -> None:
        request_id = pending.request_id
        if self._approval_wait <= 0:
            log.error(
                "signing with %s waits for approval: signing request %s (approve it, then "
                "run the tool again)",
                key.name,
                request_id,
            )
            raise pending
        log.warning(
            "signing with %s waits for approval: signing request %s; waiting up to %gs",
            key.name,
            request_id,
            self._approval_wait,
        )
        state = self._client.wait_for_approval(request_id, self._approval_wait, self._poll_seconds)
        if state.status is not p.ApprovalStatus.APPROVED:
            log.error("signing request %s is %s", request_id, state.status.value)
            raise pending


def _who(info: p.ClientInfo) -> str:
    if info.process is not None:
        return f"{info.tool or 'a process'} (pid {info.process.pid})"
    return "a tool"
