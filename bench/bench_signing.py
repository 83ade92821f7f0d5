"""What requiring a signature adds to a restore: ``run --prepare-only`` with and without
``--trusted-keys`` on the same bundle, alternated, in one run (no guest runs; any /dev/kvm).

``python bench/bench_signing.py --bundle app.smolmachine [--runs 10]`` prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, summary

SMOLVMM = [sys.executable, "-m", "smolvmm"]


def restore_phases(bundle: Path, extra: list[str]) -> tuple[dict[str, float], float]:
    """One ``run --prepare-only`` process: its phases (ms) and its wall time (s)."""
    began = time.perf_counter()
    done = subprocess.run(
        [*SMOLVMM, "run", "--prepare-only", *extra, str(bundle)], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - began
    return json.loads(done.stderr.strip().splitlines()[-1])["phases_ms"], wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a raw bundle (e.g. from bench_guest)")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smolbench-") as work:
        keys, signed = Path(work) / "keys", Path(work) / "signed.smolmachine"
        keys.mkdir()
        subprocess.run([*SMOLVMM, "keygen", str(keys / "bench")], capture_output=True, check=True)
        shutil.copy(args.bundle, signed)
        began = time.perf_counter()
        subprocess.run([*SMOLVMM, "sign", "--key", str(keys / "bench"), str(signed)], capture_output=True, check=True)
        sign_s = time.perf_counter() - began
        plain: dict[str, list[float]] = {"teardown": [], "process_s": []}
        checked: dict[str, list[float]] = {"signature": [], "teardown": [], "process_s": []}
        for _ in range(args.runs):  # alternated, so load changes hit both alike
            for results, bundle, extra in ((plain, args.bundle, []), (checked, signed, ["--trusted-keys", str(keys)])):
                phases, wall = restore_phases(bundle, extra)
                for name in results:
                    results[name].append(wall if name == "process_s" else phases[name])
    report = {
        "machine": machine_info(),
        "bundle_bytes": args.bundle.stat().st_size,
        "sign_process_s": round(sign_s, 3),
        "unsigned_restore": {name: summary(values) for name, values in plain.items()},
        "signed_restore": {name: summary(values) for name, values in checked.items()},
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
