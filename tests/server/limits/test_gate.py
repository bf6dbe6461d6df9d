"""The bound on password verifications at once, per process."""

from __future__ import annotations

import anyio
import pytest

from signery.errors import PasswordChecksBusy
from signery.server.limits.service import PasswordGate


def test_waiting_sign_ins_get_a_429_when_no_verification_slot_frees() -> None:
    gate = PasswordGate(1, 0.05)
    outcomes: list[str] = []

    async def hold(release: anyio.Event) -> None:
        async with gate.slot():
            outcomes.append("first")
            await release.wait()

    async def main() -> None:
        release = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, release)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(PasswordChecksBusy) as refused:
                async with gate.slot():
                    outcomes.append("second")
            assert refused.value.extra["retry_after"] == 1
            release.set()
        async with gate.slot():  # free again
            outcomes.append("third")

    anyio.run(main)
    assert outcomes == ["first", "third"]
