"""Plant known bugs in a copy of the library, one at a time, and check that the tests catch each.

Each entry of ``planted_bugs.json`` (beside this file) replaces an exact piece of text in one
library file, e.g. flips the sign of the IAF log-determinant, and names the tests that must then
fail. For every entry this script copies the repository (without ``.git``) into a scratch folder
beside it, applies the change, runs ``pytest`` on the named tests with that copy first on
``PYTHONPATH``, and reports whether the bug was caught. It is not part of the test suite (it
runs the suite's tests dozens of times); run it after changing tests or the code they pin:

    python tests/planted_bugs.py            # every entry
    python tests/planted_bugs.py E L T      # only these ids

It exits with status 1 if an entry's text is no longer found (the entry needs updating) or a
planted bug survives.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRIES = Path(__file__).with_name("planted_bugs.json")
IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "runs", ".planted-*")


def plant(copy: Path, entry: dict) -> None:
    """Apply one entry's text replacement inside ``copy``."""
    path = copy / entry["file"]
    text = path.read_text()
    count = entry.get("count", 1)
    found = text.count(entry["old"])
    if found != count:
        raise LookupError(f"{entry['file']}: expected {count} occurrence(s), found {found}")
    path.write_text(text.replace(entry["old"], entry["new"]))


def run_tests(copy: Path, tests: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)


def check(entry: dict) -> tuple[str, float, str]:
    """``(verdict, seconds, last line of pytest)`` for one entry."""
    start = time.perf_counter()
    # Beside the repository, so that the tests find ../shared/data as they do in a checkout.
    with tempfile.TemporaryDirectory(prefix=".planted-", dir=REPO.parent) as tmp:
        copy = Path(tmp) / REPO.name
        shutil.copytree(REPO, copy, ignore=IGNORE)
        try:
            plant(copy, entry)
        except LookupError as error:
            return "STALE", time.perf_counter() - start, str(error)
        result = run_tests(copy, entry["tests"])
    lines = (result.stdout.strip() or result.stderr.strip() or "?").splitlines()
    # pytest exits 1 when tests ran and some failed; other codes are errors, not catches.
    verdict = "caught" if result.returncode == 1 else f"SURVIVED (exit {result.returncode})"
    return verdict, time.perf_counter() - start, lines[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ids", nargs="*", help="entry ids to run (default: all)")
    args = parser.parse_args(argv)
    entries = json.loads(ENTRIES.read_text())
    unknown = sorted(set(args.ids) - {e["id"] for e in entries})
    if unknown:
        parser.error(f"unknown ids {unknown}")
    chosen = [e for e in entries if not args.ids or e["id"] in args.ids]
    # The named tests must pass on the code as it is, or a failure would prove nothing.
    tests = sorted({t for e in chosen for t in e["tests"]})
    baseline = run_tests(REPO, tests)
    print(f"baseline: {baseline.stdout.strip().splitlines()[-1]}")
    if baseline.returncode != 0:
        print(baseline.stdout[-3000:])
        return 1
    failures = 0
    for entry in chosen:
        verdict, seconds, last = check(entry)
        failures += verdict != "caught"
        print(f"{entry['id']:>5}  {verdict:<22} {seconds:6.1f} s  {entry['what']}  [{last}]")
        sys.stdout.flush()
    print(f"{failures} of the planted bugs survived or are stale" if failures else "all caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
