"""Run `faster extract` in a subprocess with faults injected from test code (never from faster itself).

    python tests/extract_driver.py [--fault SUBSTRING:sleep=S|SUBSTRING:exit] [--kill-after-shards K] -- ARGS...

ARGS are those of `faster extract`. The fault is patched into the decoding (this process's and the
decode workers', helpers.inject_decode_fault); --kill-after-shards SIGKILLs the process inside
shard K+1, after K complete shards (helpers.kill_after_shards).
"""
import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    rest = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault")
    parser.add_argument("--kill-after-shards", type=int)
    args = parser.parse_args(argv[:rest])
    patches = pytest.MonkeyPatch()  # undone only when the process ends
    if args.fault:
        helpers.inject_decode_fault(patches, args.fault)
    if args.kill_after_shards is not None:
        helpers.kill_after_shards(patches, args.kill_after_shards)
    from faster.cli import cli

    cli(["extract", *argv[rest + 1:]], prog_name="faster")


if __name__ == "__main__":
    main()
