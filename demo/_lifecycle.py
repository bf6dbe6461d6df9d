"""The key lifecycle chapter: rotation, approvals, a refusal and its recovery."""

from __future__ import annotations

import json
import time

from demo._common import (
    ACCOUNT_NAME,
    APPROVER,
    APPROVER_PROFILE,
    BUILD_PROFILE,
    DEMO_ORG,
    EC_KEY,
    EXIT_APPROVAL_PENDING,
    GATED_KEY,
    REFUSAL_CODES,
    RSA_KEY,
    StepFailed,
)
from demo._runner import Runner


class LifecycleSteps(Runner):
    """The key lifecycle chapter."""

    def step_rotate(self) -> None:
        self.cli("key", "rotate", RSA_KEY)
        # The build machine changes nothing: it signs "with release-rsa" as before.
        done = self.cli(
            "sign", "--key", RSA_KEY, "-o", "app.bin.rsa-v2.sig", "app.bin", "--json",
            profile=BUILD_PROFILE,
        )  # fmt: skip
        try:
            signed = json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("`signery sign --json` did not print JSON", done.stdout) from e
        used = signed[0].get("key_version") if isinstance(signed, list) and signed else None
        self.expect(used == 2, f"the signature names key version {used}, not 2", done.stdout)
        key = self.cli_json("key", "show", RSA_KEY)
        versions = {v["version"]: v for v in key.get("versions", [])}
        self.expect(
            versions.get(1, {}).get("status") == "archived"
            and versions.get(2, {}).get("status") == "active",
            "expected version 1 archived and version 2 active",
            json.dumps(key.get("versions"), indent=2),
        )
        (self.out / "pubkey-rsa-v2.pem").write_text(versions[2]["public_key_pem"], "ascii")
        self.expect(
            versions[1]["public_key_pem"].strip()
            == (self.out / "pubkey-rsa.pem").read_text("ascii").strip(),
            "the archived version does not list the original public key",
        )
        for pub, sig in (("pubkey-rsa-v2.pem", "app.bin.rsa-v2.sig"),
                         ("pubkey-rsa.pem", "app.bin.rsa.sig")):  # fmt: skip
            done = self.openssl_run("dgst", "-sha256", "-verify", pub, "-signature", sig, "app.bin")
            self.expect("Verified OK" in done.stdout, f"openssl does not verify {sig} with {pub}")
        done = self.run(
            [self.openssl, "dgst", "-sha256", "-verify", "pubkey-rsa.pem", "-signature",
             "app.bin.rsa-v2.sig", "app.bin"],
            check=False, show=False,
        )  # fmt: skip
        self.expect(
            done.returncode != 0, "the new version's signature verifies with the old key pair"
        )
        self.note("openssl: the version 2 signature does not verify with version 1's public key")
        self.note(
            "version 2 signs at once; version 1 is archived but listed, so the signature "
            "made before the rotation still verifies"
        )

    def sign_pending(self, output: str) -> str:
        """`signery sign` on the gated key must stop at a pending request; its id."""
        done = self.cli(
            "sign", "--key", GATED_KEY, "-o", output, "app.bin", "--json",
            profile=BUILD_PROFILE, check=False, show=False,
        )  # fmt: skip
        self.print_output(done.stderr, "yellow")
        self.expect(
            done.returncode == EXIT_APPROVAL_PENDING,
            f"expected exit status {EXIT_APPROVAL_PENDING} (approval pending), "
            f"got {done.returncode}",
            done.stdout + done.stderr,
        )
        self.expect(not (self.out / output).exists(), f"{output} was written without approval")
        try:
            (result,) = json.loads(done.stdout)
        except ValueError as e:
            raise StepFailed("`signery sign --json` did not print JSON", done.stdout) from e
        self.expect(result.get("code") == "approval_pending", "not pending", done.stdout)
        return str(result["request_id"])

    def step_approval(self) -> None:
        # A release manager: a user holding the approver role on the team's TSG.
        user = self.cli_json("user", "create", APPROVER, "--tsg", self.state.tsg_id)
        self.secrets += [str(user.get("password") or "")]
        self.cli("role", "bind", APPROVER, "approver", "--tsg", self.state.tsg_id)
        token = self.cli_json("user", "token", "create", "--name", "demo", "--user", APPROVER)
        self.secrets.append(str(token["token"]))
        self.cli(
            "login", "--server", self.state.url, "--api-token", str(token["token"]),
            profile=APPROVER_PROFILE,
        )  # fmt: skip
        self.cli_json(
            "key", "create", GATED_KEY, "--tsg", self.state.tsg_id, "--algorithm", "EC_P256",
            "--ca", "builtin", "--org", DEMO_ORG, "--cn", "Signery Demo Gated Release",
        )  # fmt: skip
        self.cli("key", "public-key", GATED_KEY, "-o", "pubkey-gated.pem", show=False)
        self.cli(
            "key", "policy", "set", GATED_KEY, "--approvals", "1", "--approver", APPROVER,
            "--grant-uses", "1", "--grant-ttl", "8h", "--signer", ACCOUNT_NAME,
        )  # fmt: skip
        request_id = self.sign_pending("app.bin.gated.sig")
        self.note(f"the build machine got signing request {request_id}: nothing was signed")
        self.cli("approval", "list", profile=APPROVER_PROFILE)
        self.cli(
            "approval", "approve", request_id, "--comment", "release 1.0 is go",
            profile=APPROVER_PROFILE,
        )  # fmt: skip
        self.cli(
            "sign", "--key", GATED_KEY, "--wait", "--wait-timeout", "60s",
            "-o", "app.bin.gated.sig", "app.bin", profile=BUILD_PROFILE,
        )  # fmt: skip
        done = self.openssl_run(
            "dgst", "-sha256", "-verify", "pubkey-gated.pem", "-signature", "app.bin.gated.sig",
            "app.bin",
        )  # fmt: skip
        self.expect("Verified OK" in done.stdout, "openssl does not verify app.bin.gated.sig")
        self.cli("grant", "list", "--key", GATED_KEY, profile=APPROVER_PROFILE)
        grants = self.cli_json("grant", "list", "--key", GATED_KEY, profile=APPROVER_PROFILE)
        self.expect(
            any(g.get("uses") == 1 and g.get("max_uses") == 1 for g in grants),
            "the single-use grant is not shown as used once",
            json.dumps(grants, indent=2),
        )
        again = self.sign_pending("app.bin.gated-2.sig")
        self.expect(again != request_id, "the used-up grant's request was reused")
        self.note("approved once, signed once (openssl verifies it); the grant is used up")
        self.note(f"so the next signing waits for approval again (request {again})")

    def step_refusal(self) -> None:
        self.state.disabled_at = time.time()
        self.cli("account", "disable", self.state.client_id)
        refused = self.out / "refused.sig"
        done = self.cli(
            "sign", "--key", EC_KEY, "-o", refused, "app.bin", profile=BUILD_PROFILE, check=False
        )
        self.expect(
            done.returncode != 0,
            "signing with a disabled account succeeded",
            done.stdout + done.stderr,
        )
        self.expect(not refused.exists(), "a signature was written for a disabled account")
        codes = [c for c in REFUSAL_CODES if c in done.stderr]
        self.expect(
            bool(codes),
            f"the refusal does not name one of the codes {', '.join(REFUSAL_CODES)}",
            done.stderr,
        )
        self.note(
            f"refused with exit status {done.returncode} and error code [bold]{codes[0]}[/]; "
            "no signature was written"
        )

    def step_reenable(self) -> None:
        self.cli("account", "enable", self.state.client_id)
        target = self.tmp / "after-enable.sig"
        self.cli("sign", "--key", EC_KEY, "-o", target, "app.bin", profile=BUILD_PROFILE)
        self.expect(target.is_file(), "no signature after the account was enabled again")
