"""A sandbox pool: N clones of one bundle run at once, each given its own shell command.

    python examples/pool.py app.smolmachine 8

Every clone resumes from the same bundle (sharing its pages), gets a fresh clock and RNG, runs
one command, prints what it said, and is stopped. This is the pattern Firecracker-based
sandbox services build by hand.
"""

from __future__ import annotations

import argparse
import os
import sys

import anyio

import smolvmm


async def run_in_clone(bundle: str, index: int, results: dict[int, str]) -> None:
    command = f"echo clone-{index}: $(( {index} * {index} )) $(cat /proc/sys/kernel/random/uuid)"
    token = os.urandom(4).hex()
    async with smolvmm.Machine.restore(bundle) as machine:
        # The quotes keep the end marker out of the terminal's echo of the typed line.
        await machine.console.send(f"{command}; echo END-{token[:4]}''{token[4:]}\n".encode())
        output = await machine.console.wait_for(f"END-{token}", timeout=120)
    line = next(part for part in output.decode(errors="replace").splitlines() if part.startswith(f"clone-{index}:"))
    results[index] = line


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
