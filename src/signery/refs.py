"""How a caller names an object: :class:`KeyRef`, shared by client and server.

One rule, written once: a reference is a name, and also an id when it looks
like one (a UUID written the way the server writes its ids: lowercase, with
hyphens). A name may itself look like a UUID, so a lookup by a reference that
looks like an id matches the id or the name; any other reference matches names
only. Keys are named this way everywhere (signing, management, the client), and
so are built-in accounts and users in a key's policy and every object the server
looks up by name or id (``signery.server.tsg.tree.rows_by_ref``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["KeyRef"]

# As signery.server.persistence.db.new_id writes ids (str(uuid.uuid4())).
_ID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class KeyRef:
    """A name, or an id when ``is_id`` (the text looks like one and may still be
    a name). Make one with :meth:`parse`."""

    text: str
    is_id: bool

    @classmethod
    def parse(cls, text: str) -> KeyRef:
        return cls(text, _ID_PATTERN.fullmatch(text) is not None)

    @property
    def name(self) -> str:
        """The name this reference means (every reference may be a name)."""
        return self.text

    @property
    def id(self) -> str | None:
        """The id this reference means, when it looks like one."""
        return self.text if self.is_id else None

    def matches_id(self, object_id: str) -> bool:
        """Whether this reference names the object with ``object_id`` by its id."""
        return self.is_id and object_id == self.text

    def __str__(self) -> str:
        return self.text
