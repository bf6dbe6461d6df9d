"""The audit chapter: events, hash chains and checkpoints, usage counters."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from demo._common import (
    ACCOUNT_NAME,
    EC_KEY,
    REFUSAL_CODES,
    RSA_KEY,
    StepFailed,
)
from demo._runner import Runner


class AuditSteps(Runner):
    """The audit chapter."""

    def step_audit(self) -> None:
        done = self.cli("audit", "list", "--limit", "1000", "--json", show=False)
        try:
            events: list[dict[str, Any]] = json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("`signery audit list --json` did not print JSON", done.stdout) from e
        (self.out / "audit-events.json").write_text(done.stdout, "utf-8")
        self.expect(bool(events), "there are no audit events")
        self.print_audit_table(events)

        def by_account(e: dict[str, Any]) -> bool:
            principal = e.get("principal") or {}
            return principal.get("id") in (self.state.account_id, self.state.client_id) or (
                principal.get("type") == "account" and principal.get("name") == ACCOUNT_NAME
            )

        ok = [
            e
            for e in events
            if str(e.get("kind", "")).startswith("signing.")
            and e.get("outcome") == "succeeded"
            and by_account(e)
        ]
        least = 4 + len(self.hardware)
        self.expect(
            len(ok) >= least, f"expected at least {least} successful signings, found {len(ok)}"
        )
        refusals = [
            e
            for e in events
            if e.get("outcome") != "succeeded"
            and e.get("reason") in REFUSAL_CODES
            and by_account(e)
        ]
        self.expect(
            bool(refusals),
            "the refused signing of the disabled account is not in the audit events",
        )
        r = refusals[0]
        self.note(f"{len(events)} events saved to audit-events.json; {len(ok)} successful signings")
        self.note(
            f"the refusal is recorded: kind {escape(str(r.get('kind')))}, outcome "
            f"{escape(str(r.get('outcome')))}, reason [bold]{escape(str(r.get('reason')))}[/]"
        )

    def step_audit_verify(self) -> None:
        checkpoints = self.out / "audit-checkpoints"
        self.cli("audit", "checkpoint")
        files = sorted(checkpoints.glob("*.json"))
        self.expect(bool(files), f"no checkpoint was exported to {checkpoints}")
        self.cli("audit", "verify", "--checkpoints", checkpoints)
        # An auditor's copy of the database, with one signing event quietly edited.
        copy = self.tmp / "audit-copy.db"
        with sqlite3.connect(self.data_dir / "signery.db") as live, sqlite3.connect(copy) as dst:
            live.backup(dst)
        with sqlite3.connect(copy) as db:
            row = db.execute(
                "SELECT id FROM audit_events WHERE kind = 'signing.sign.succeeded' "
                "AND hash IS NOT NULL ORDER BY seq LIMIT 1"
            ).fetchone()
            self.expect(row is not None, "no chained signing event to edit")
            db.execute("UPDATE audit_events SET digest = ? WHERE id = ?", ("00" * 32, row[0]))
        done = self.cli(
            "audit", "verify", "--database-url", f"sqlite:///{copy}", "--checkpoints",
            checkpoints, "--json", check=False, show=False,
        )  # fmt: skip
        self.expect(
            done.returncode == 1, "the edited copy passed `signery audit verify`", done.stdout
        )
        try:
            report = json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("`signery audit verify --json` did not print JSON", done.stdout) from e
        found = json.dumps(report)
        self.expect(row[0] in found and "altered" in found, "the edit is not reported", found)
        self.note(
            f"{len(files)} signed checkpoint(s) exported to audit-checkpoints/; "
            "the live chains verify clean"
        )
        self.note(f"the copy with one edited event is caught: altered, event {row[0]}")

    def print_audit_table(self, events: list[dict[str, Any]]) -> None:
        """The audit events as a compact table (the full records are in the JSON file)."""
        names = {v: k for k, v in self.state.key_ids.items()}
        wide = self.console.width >= 110
        table = Table(header_style="bold", pad_edge=False, box=None)
        table.add_column("time")
        table.add_column("kind", no_wrap=True)
        table.add_column("outcome", no_wrap=True)
        table.add_column("reason", overflow="fold")
        table.add_column("principal", overflow="fold")
        table.add_column("key", overflow="fold")
        if wide:
            table.add_column("digest")
        for event in events:
            outcome = str(event.get("outcome"))
            colour = "green" if outcome == "succeeded" else "bold red"
            principal = event.get("principal") or {}
            key_id = event.get("key_id")
            row = [
                str(event.get("time", ""))[11:19],
                escape(str(event.get("kind"))),
                f"[{colour}]{escape(outcome)}[/]",
                escape(str(event.get("reason") or "")),
                escape(str(principal.get("name") or principal.get("id") or principal.get("type"))),
                escape(names.get(key_id, key_id) if key_id else ""),
            ]
            if wide:
                row.append(str(event.get("digest") or "")[:16])
            table.add_row(*row)
        self.console.print(Padding(table, (0, 0, 0, 4), expand=False))

    def step_usage(self) -> None:
        done = self.cli("usage", "--json", show=False)
        try:
            report: dict[str, Any] = json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("`signery usage --json` did not print JSON", done.stdout) from e
        (self.out / "usage.json").write_text(done.stdout, "utf-8")
        counters: list[dict[str, Any]] = report.get("counters", [])
        table = Table(header_style="bold", pad_edge=False, box=None)
        for column in ("type", "name", "successes", "failures", "last used"):
            table.add_column(column, justify="right" if column.endswith("es") else "left")
        for c in counters:
            table.add_row(
                escape(str(c.get("subject_type"))),
                escape(str(c.get("name"))),
                str(c.get("successes")),
                str(c.get("failures")),
                str(c.get("last_used_at") or "")[:19],
            )
        self.console.print(Padding(table, (0, 0, 0, 4), expand=False))
        by_name = {(c.get("subject_type"), c.get("name")): c for c in counters}
        expected = {
            ("key", EC_KEY): 3,
            ("key", RSA_KEY): 1,
            **{("key", store.key): 1 for store in self.hardware},
            ("account", ACCOUNT_NAME): 4 + len(self.hardware),
        }
        for (kind, name), least in expected.items():
            found = by_name.get((kind, name))
            successes = int(found.get("successes", 0)) if found else 0
            self.expect(
                successes >= least,
                f"{kind} {name} counts {successes} successful signings; expected {least}",
                json.dumps(report, indent=2),
            )
        self.note("counters saved to usage.json")
