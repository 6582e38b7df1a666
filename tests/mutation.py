"""Mutation testing of one library module with mutmut, in a scratch copy of the repository.

mutmut makes hundreds of small changes to the module (an operator flipped, a constant moved, a
call dropped), runs the tests that cover each changed function, and counts the changes no test
notices ("survivors"). It is far too slow for CI, so it runs by hand:

    python tests/mutation.py pyro_vae/likelihoods.py tests/test_likelihoods.py

The copy is made beside the repository (``../.mutation-<module>/``) and kept, so that
``mutmut show NAME`` and ``mutmut browse`` work there afterwards; the score (killed, survived,
...) is printed as JSON and the survivors are listed. ``raise`` statements are not mutated: a
changed error message is not a wrong implementation (the tests pin messages with ``match=``
where the wording matters). Torch runs one thread per test process, and mutmut forks its test
workers from a clean fork server (forking a process whose OpenMP pool is running hangs).
"""

from __future__ import annotations

import argparse
import json
import os
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
    args = parser.parse_args(argv)
    copy = REPO.parent / f".mutation-{Path(args.module).stem}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(REPO, copy, ignore=IGNORE)
    tests = "\n".join(f"    {t}" for t in args.tests)
    with open(copy / "setup.cfg", "a") as f:
        f.write(MUTMUT_CONFIG.format(module=args.module, tests=tests))
    # mutmut puts its mutated copy on the path itself (PYTHONPATH would hide it).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    mutmut = [sys.executable, "-m", "mutmut"]
    run = [*mutmut, "run", "--max-children", str(args.max_children)]
    subprocess.run(run, cwd=copy, env=env, stdout=subprocess.DEVNULL, check=True)
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=copy, env=env, check=True)
    stats = json.loads((copy / "mutants" / "mutmut-cicd-stats.json").read_text())
    print(json.dumps({"module": args.module, "tests": args.tests, **stats}))
    results = subprocess.run(
        [*mutmut, "results"], cwd=copy, env=env, capture_output=True, text=True, check=True
    )
    print(results.stdout, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
