"""Run `faster extract` in a subprocess with faults injected from test code (never from faster itself).

    python tests/extract_driver.py [--fault SUBSTRING:sleep=S|SUBSTRING:exit] [--kill-after-shards K] -- ARGS...

ARGS are those of `faster extract`. The fault replaces the decode function of the decode workers;
--kill-after-shards SIGKILLs the process inside shard K+1, after K complete shards.
"""
import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402

from faster.extract import pipeline  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    rest = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault")
    parser.add_argument("--kill-after-shards", type=int)
    args = parser.parse_args(argv[:rest])
    hooks = {}
    if args.fault:
        hooks["decode"] = helpers.fault(args.fault)
    if args.kill_after_shards is not None:
        hooks["after_add"] = helpers.kill_after_shards(args.kill_after_shards)
    pipeline.run_extract = functools.partial(pipeline.run_extract, **hooks)  # what `faster extract` calls
    from faster.cli import cli

    cli(["extract", *argv[rest + 1:]], prog_name="faster")


if __name__ == "__main__":
    main()
