"""Dependency vulnerability audit for CI: report every finding, fail only on the fixable ones.

Run by ``make audit`` with pip-audit installed in its own virtualenv and pointed at the
project's environment through ``PIPAPI_PYTHON_LOCATION``, so the auditor's own packages are not
mistaken for the project's. Extra arguments go to pip-audit (e.g. ``--ignore-vuln ID`` for a
finding judged harmless, with the reason in the Makefile).

Exit codes:
    0  nothing fixable found; findings without a fixed release are printed, and an unreachable
       vulnerability database is reported, but neither can be acted on, so neither blocks CI
    1  at least one vulnerability has a fixed release: upgrade
    2  pip-audit failed for another reason than the network
"""

from __future__ import annotations

import json
import subprocess
import sys

NETWORK_SIGNS = (
    "ConnectionError",
    "Max retries exceeded",
    "NameResolutionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "timed out",
    "ProxyError",
    "SSLError",
)
NOT_FOUND = "not found on PyPI"


def run_pip_audit(extra: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip_audit", "--format", "json", "--progress-spinner", "off"]
    return subprocess.run([*command, "--skip-editable", *extra], capture_output=True, text=True)


def main(extra: list[str]) -> int:
    result = run_pip_audit(extra)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        if any(sign in result.stderr for sign in NETWORK_SIGNS):
            print(f"audit: SKIPPED, the vulnerability database could not be reached: {last}")
            return 0
        print(result.stderr, file=sys.stderr)
        print(f"audit: FAILED, pip-audit exited {result.returncode}: {last}")
        return 2
    lines, code = summarize(report)
    print("\n".join(lines))
    return code


def summarize(report: dict) -> tuple[list[str], int]:
    """The lines to print for a pip-audit JSON report, and the exit code it deserves."""
    dependencies = report["dependencies"]
    unlooked = [d["name"] for d in dependencies if NOT_FOUND in d.get("skip_reason", "")]
    audited = [d for d in dependencies if "skip_reason" not in d]
    if not audited:
        return [
            f"audit: SKIPPED, none of {len(dependencies)} packages could be looked up in the "
            "vulnerability database (no network, or an index without the vulnerability API)"
        ], 0
    findings = [(d, v) for d in audited for v in d.get("vulns", [])]
    fixable = [(d, v) for d, v in findings if v.get("fix_versions")]
    lines = []
    if findings:
        lines.append(f"{'package':<24} {'version':<12} {'vulnerability':<22} fixed in")
        for d, v in findings:
            fixed = ", ".join(v.get("fix_versions", [])) or "no fix yet (reported only)"
            lines.append(f"{d['name']:<24} {d['version']:<12} {v['id']:<22} {fixed}")
    if unlooked:
        lines.append(
            f"note: {len(unlooked)} packages could not be looked up: {', '.join(unlooked)}"
        )
    lines.append(
        f"audit: {len(audited)} packages audited, {len(findings)} known vulnerabilities, "
        f"{len(fixable)} with a fixed release"
    )
    return lines, 1 if fixable else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
