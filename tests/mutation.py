"""Mutation testing of one library module with mutmut, in a scratch copy of the repository.

mutmut makes hundreds of small changes to the module (an operator flipped, a constant moved, a
call dropped), runs the tests that cover each changed function, and counts the changes no test
notices ("survivors"). It is far too slow for CI, so it runs by hand:

    python tests/mutation.py pyro_vae/likelihoods.py tests/test_likelihoods.py

The copy is made beside the repository (``../.mutation-<module>/``) and kept, so that
``mutmut show NAME`` and ``mutmut browse`` work there afterwards; the score (killed, survived,
...) is printed as JSON and the survivors are listed. ``--sample N`` tests a random sample of N
of the module's mutants (seeded, so the same N repeat), for an estimate of the score when the
whole run would take hours. ``raise`` statements are not mutated: a
changed error message is not a wrong implementation (the tests pin messages with ``match=``
where the wording matters). Torch runs one thread per test process, and mutmut forks its test
workers from a clean fork server (forking a process whose OpenMP pool is running hangs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from planted_bugs import IGNORE, REPO

MUTMUT_CONFIG = """
[mutmut]
source_paths = pyro_vae
only_mutate = {module}
pytest_add_cli_args_test_selection =
{tests}
pytest_add_cli_args =
    -p
    no:cacheprovider
do_not_mutate_patterns = ^\\s*raise\\b
process_isolation = forkserver
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="library file to mutate, e.g. pyro_vae/estimators.py")
    parser.add_argument("tests", nargs="+", help="test files or node ids to run")
    parser.add_argument("--max-children", type=int, default=2, help="parallel test workers")
    parser.add_argument("--sample", type=int, default=None, help="test only N random mutants")
    args = parser.parse_args(argv)
    copy = REPO.parent / f".mutation-{Path(args.module).stem}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(REPO, copy, ignore=IGNORE)
    # mutmut runs the tests in copy/mutants, whose conftest looks for ../shared/data beside it.
    if (REPO.parent / "shared").is_dir():
        (copy / "shared").symlink_to(REPO.parent / "shared")
    tests = "\n".join(f"    {t}" for t in args.tests)
    with open(copy / "setup.cfg", "a") as f:
        f.write(MUTMUT_CONFIG.format(module=args.module, tests=tests))
    # mutmut puts its mutated copy on the path itself (PYTHONPATH would hide it).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    mutmut = [sys.executable, "-m", "mutmut"]
    run = [*mutmut, "run", "--max-children", str(args.max_children)]
    names = sample_mutants(copy, env, args.module, args.sample) if args.sample else []
    subprocess.run([*run, *names], cwd=copy, env=env, stdout=subprocess.DEVNULL, check=True)
    results = subprocess.run(
        [*mutmut, "results", "--all", "true"], cwd=copy, env=env, capture_output=True, text=True
    )
    lines = [line.strip() for line in results.stdout.splitlines() if ": " in line]
    status = dict(line.rsplit(": ", 1) for line in lines)
    tested = {k: v for k, v in status.items() if not names or k in names}
    counts = {v: sum(s == v for s in tested.values()) for v in sorted(set(tested.values()))}
    summary = {"module": args.module, "tests": args.tests, "mutants": len(status)}
    print(json.dumps({**summary, "tested": len(tested), **counts}))
    for name, outcome in sorted(tested.items()):
        if outcome != "killed":
            print(f"{outcome}: {name}")
    return 0


def sample_mutants(copy: Path, env: dict, module: str, size: int) -> list[str]:
    """Generate the mutants (a run filtered to a name no mutant has stops right after
    generating them and collecting which tests cover what) and draw ``size`` of their names."""
    subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "no-mutant-has-this-name"],
        cwd=copy,
        env=env,
        capture_output=True,
    )
    meta = json.loads((copy / "mutants" / f"{module}.meta").read_text())
    names = sorted(meta["exit_code_by_key"])
    return sorted(random.Random(0).sample(names, min(size, len(names))))


if __name__ == "__main__":
    sys.exit(main())
