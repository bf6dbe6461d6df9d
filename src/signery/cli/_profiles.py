"""CLI profiles: where ``signery login`` remembers servers and credentials.

Stored as JSON in ``$SIGNERY_HOME/profiles.json`` (default ``~/.config/signery``),
mode 0600 because it may hold an API token. An account's private key is never
copied here: the profile stores the path of the key file. A command-line
concern: library users hand ``signery.client.Client`` their credentials directly.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from signery.errors import ClientError

DEFAULT_PROFILE = "default"
FILE_NAME = "profiles.json"


def home_dir() -> Path:
    """Where profiles live: $SIGNERY_HOME, else $XDG_CONFIG_HOME/signery, else ~/.config/signery."""
    if os.environ.get("SIGNERY_HOME"):
        return Path(os.environ["SIGNERY_HOME"])
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base) if base else Path.home() / ".config") / "signery"


@dataclass
class Profile:
    server: str
    client_id: str | None = None
    key_file: str | None = None
    api_token: str | None = None
    ca_bundle: str | None = None

    def redacted(self) -> dict[str, str | None]:
        data = asdict(self)
        if data.get("api_token"):
            data["api_token"] = "<set>"
        return data


@dataclass
class ProfileStore:
    home: Path
    profiles: dict[str, Profile] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.home / FILE_NAME

    @classmethod
    def load(cls, home: Path) -> ProfileStore:
        store = cls(home)
        if not store.path.exists():
            return store
        mode = stat.S_IMODE(store.path.stat().st_mode)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ClientError(f"{store.path} is readable by others (mode {mode:o}); chmod 600 it")
        try:
            raw = json.loads(store.path.read_text("utf-8"))
            store.profiles = {
                name: Profile(**values) for name, values in raw.get("profiles", {}).items()
            }
        except (ValueError, TypeError, AttributeError) as e:
            raise ClientError(f"{store.path} is not a valid profiles file") from e
        return store

    def get(self, name: str) -> Profile | None:
        return self.profiles.get(name)

    def put(self, name: str, profile: Profile) -> None:
        self.profiles[name] = profile
        self._save()

    def remove(self, name: str) -> bool:
        found = self.profiles.pop(name, None) is not None
        if found:
            self._save()
        return found

    def _save(self) -> None:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {"profiles": {name: asdict(p) for name, p in sorted(self.profiles.items())}}
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)
