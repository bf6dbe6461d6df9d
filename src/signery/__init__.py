"""Signery: self-hosted remote code signing.

Private keys stay in their key store; build machines send digests and receive
signatures that the client writes into the artifact's real signature format.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("signery")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
