"""Identifier types shared by client and server.

Every id is a string on the wire and in the database; these ``NewType`` names
keep a key id from being passed where an account id is expected (mypy checks
it; at run time they are plain ``str``). Key, key-version and account ids are
UUIDs (``signery.refs.KeyRef`` tells them from names); a TSG id is ten digits.
"""

from __future__ import annotations

from typing import NewType

__all__ = ["AccountId", "KeyId", "KeyVersionId", "TsgId"]

AccountId = NewType("AccountId", str)
"""A built-in account's id (not its ``client_id``, which its tokens name)."""

KeyId = NewType("KeyId", str)
"""A signing key's id: stable across its versions, renewals and rotations."""

KeyVersionId = NewType("KeyVersionId", str)
"""A ``key_versions`` row: one key pair of a signing key (usage is counted per version)."""

TsgId = NewType("TsgId", str)
"""A Tenant Security Group's 10-digit id."""
