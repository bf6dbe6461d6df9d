"""What a verified access token says: the account that signs, and until when.
A value of the access room, so that the HTTP edge and the signing service read it
without depending on the accounts room that issues it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from signery.ids import AccountId, TsgId


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """A fully verified access token."""

    account_id: AccountId
    client_id: str
    tsg_id: TsgId
    expires_at: datetime
    # Valid only while the account's token_epoch is still this one.
    epoch: int
