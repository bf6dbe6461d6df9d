"""Files that hold secrets (the master key file, an HSM PIN file)."""

from __future__ import annotations

import stat
from pathlib import Path

from signery.errors import ConfigurationError


def read_secret_file(path: Path, what: str, *, missing_hint: str = "") -> str:
    """The text of a secret file. A file that group or others can read is refused:
    a secret that leaked into a world-readable file must not be used silently.

    ``what`` names the file in messages ("master key file"); never its content."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigurationError(f"{what} {path} does not exist{missing_hint}") from None
    except OSError as e:
        raise ConfigurationError(f"{what} {path} is not readable: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"{what} {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
        )
    try:
        return path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigurationError(f"{what} {path} is not readable text") from None
