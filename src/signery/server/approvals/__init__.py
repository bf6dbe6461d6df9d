"""Approvals: M-of-N approval of signing with a key, and the grants it creates."""
