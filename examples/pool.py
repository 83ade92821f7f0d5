"""A sandbox pool: N clones of one bundle run at once, each given its own shell command.

    python examples/pool.py app.smolmachine 8

Every clone resumes from the same bundle (sharing its pages), gets a fresh clock and RNG and
its own environment, runs one command through the guest agent (``Machine.exec``: its own
stdout, stderr and exit code), prints what it said, and is stopped. This is the pattern
Firecracker-based sandbox services build by hand.
"""

from __future__ import annotations

import argparse
import sys

import anyio

import smolvmm


async def run_in_clone(bundle: str, index: int, results: dict[int, str]) -> None:
    command = "echo clone-$N: $(( N * N )) $(cat /proc/sys/kernel/random/uuid)"
    async with smolvmm.Machine.restore(bundle, env={"N": str(index)}) as machine:
        result = await machine.exec(command, timeout=120)
    if result.exit_code != 0:
        raise smolvmm.GuestError(
            f"clone {index}: exit status {result.exit_code}: {result.stderr.decode(errors='replace')}"
        )
    results[index] = result.stdout.decode(errors="replace").strip()


async def main(bundle: str, count: int) -> None:
    results: dict[int, str] = {}
    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(run_in_clone, bundle, index, results)
    for index in sorted(results):
        print(results[index])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("count", type=int, nargs="?", default=8)
    parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    args = parser.parse_args()
    try:
        anyio.run(main, args.bundle, args.count, backend=args.backend)
    except* smolvmm.SmolvmmError as group:  # one line for the first clone that failed
        sys.exit(f"pool: {group.exceptions[0]}")
