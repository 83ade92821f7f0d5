"""Regenerate every VMM benchmark table: ``python bench/run_all.py [--out DIR]``.

The guest-booting part (bench_guest.py) runs directly on hardware KVM and inside ``tools/nested-kvm``
on a PVM host; the host-side part (bench_native.py) runs natively. Prints the Markdown tables and
writes them, with the raw JSON, into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from common import qemu_path, regular_install

from smolvmm.host.kvmprobe import probe
from smolvmm.images.guest import default_guest

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def run_guest_part(out: Path, runs: int, instances: int) -> None:
    host = probe()
    command = [
        sys.executable,
        str(BENCH / "bench_guest.py"),
        "--out",
        str(out),
        "--runs",
        str(runs),
        "--instances",
        str(instances),
        "--cli-python",
        regular_install(out / "installed"),  # as users run it: no editable install's import hook
    ]
    if host.kind == "none":
        print(f"bench: no usable /dev/kvm ({host.explanation}); skipping the guest benchmarks", file=sys.stderr)
        return
    if host.kind == "pvm":
        if qemu_path() is None:  # the nested machine is QEMU too
            print("bench: a PVM host needs QEMU for the nested machine; skipping the guest benchmarks", file=sys.stderr)
            return
        command = [str(ROOT / "tools" / "nested-kvm"), "--out", str(out), "--timeout", "3600", "python", *command[1:]]
    # Resolve (and build once) the default guest here, so the nested machine needs no apt.
    env = {**os.environ, "SMOLVMM_DEFAULT_GUEST": str(default_guest().kernel.parent)}
    done = subprocess.run(command, env=env, cwd=ROOT)
    if done.returncode:  # guest.json keeps every measure finished before; the other benchmarks still run
        print(f"bench: the guest benchmarks exited with status {done.returncode}", file=sys.stderr)


def run_nested_benches(out: Path, runs: int) -> None:
    """The guest benchmarks that run themselves inside ``tools/nested-kvm`` on a PVM host, one after
    another; one that fails leaves its error for the tables and the others still run."""
    if probe().kind == "none":
        return
    env = {**os.environ, "SMOLVMM_DEFAULT_GUEST": str(default_guest().kernel.parent)}
    for name, (_, argv) in NESTED_BENCHES.items():
        where = out / name
        where.mkdir(exist_ok=True)
        argv = [str(min(runs, 3)) if arg == "RUNS" else str(out / "plots") if arg == "PLOTS" else arg for arg in argv]
        done = subprocess.run([sys.executable, str(BENCH / argv[0]), "--out", str(where), *argv[1:]], env=env, cwd=ROOT)
        if done.returncode:
            (where / "error.txt").write_text(f"{argv[0]} exited with status {done.returncode}\n")


def run_native_part(out: Path, runs: int) -> None:
    bundle = out / "restore.smolmachine"
    if not bundle.exists():
        print("bench: no bundle from the guest benchmarks; skipping the native ones", file=sys.stderr)
        return
    subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_native.py"),
            "--bundle",
            str(bundle),
            "--out",
            str(out),
            "--runs",
            str(runs),
        ],
        cwd=ROOT,
        check=True,
    )
    places = {"BUNDLE": str(bundle), "PLOTS": str(out / "plots"), "INSTALLED": regular_install(out / "installed")}
    for name, argv in MARKDOWN_BENCHES.items():  # each prints its own tables, with the reference of the same run
        argv = [places.get(arg, arg) for arg in argv]
        done = subprocess.run(
            [sys.executable, str(BENCH / argv[0]), *argv[1:]], cwd=ROOT, check=True, capture_output=True, text=True
        )
        (out / f"{name}.md").write_text(done.stdout)


# Benchmarks that print Markdown: their titles, and their scripts and arguments (BUNDLE: the guest
# part's bundle; PLOTS: the plots directory under --out; INSTALLED: the Python of a regular install)
MARKDOWN_TITLES = {
    "imports": "Start-up imports against `import trio, anyio, cffi, construct, zstandard`",
    "restore_floor": "Host-side restore against the bare-ioctl floor",
    "format": "Save (the bundle writer) against the write floor, on the saved guest's RAM",
    "scaling": "How save and host-side restore grow with guest RAM (synthetic)",
    "block": "virtio-blk's request path: device CPU per request against `preadv` alone",
}
MARKDOWN_BENCHES = {
    "imports": ["bench_imports.py", "--bundle", "BUNDLE", "--python", "INSTALLED"],
    "restore_floor": ["bench_restore_floor.py", "--bundle", "BUNDLE"],
    "format": ["bench_format.py", "--bundle", "BUNDLE"],
    "scaling": ["bench_scaling.py", "--out", "PLOTS"],
    "block": ["bench_block.py"],
}

# Guest benchmarks run after bench_guest.py: their JSON under --out/NAME, and their scripts and
# arguments (RUNS: --runs, at most 3; PLOTS: the plots directory under --out)
NESTED_BENCHES = {
    "usernet": (
        "usernet.json",
        ["bench_usernet.py", "--only", "smolvmm_tap_vhost", "--only", "qemu_tap_vhost", "--runs", "RUNS", "--mib", "8"],
    ),
    "working_set": ("results/working-set.json", ["bench_working_set.py", "--runs", "RUNS"]),
    "clones": ("clones.json", ["bench_clones.py", "--plots", "PLOTS"]),
}


# --- rendering ---------------------------------------------------------------------------------


def rng(s: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    """min / median / max of a summary."""
    if not s:
        return "n/a"
    return " / ".join(f"{s[k] * scale:.{digits}f}" for k in ("min", "median", "max"))


def ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['median'] / b['median']:.2f}" if a and b and b["median"] else "n/a"


def machine_line(m: dict) -> str:
    where = "nested: QEMU TCG + AMD-V emulation, KVM inside" if m["nested"] else "native PVM host"
    return f"{m['cpu']}, {m['cores']} cores, kernel {m['kernel']} ({where}; load {m['load']} at start)"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def error_of(section: dict) -> str:
    return f"\nFailed: `{section['error']}`\n" if "error" in section else ""


def render_guest(g: dict) -> list[str]:
    parts = [
        f"Guest measures: {machine_line(g['machine'])}; {g.get('qemu_version', 'QEMU absent')}; "
        f"{g['runs']} runs each, min / median / max; ratio = smolvmm median / QEMU median."
    ]
    boot = g.get("cold_boot", {})
    parts.append(
        "### Cold boot to the ready line (s, process start → `smolvmm: guest ready` on the console)\n\n"
        + table(
            ["VMM", "seconds", "ratio to QEMU"],
            [
                [
                    "smolvmm `boot --cpus 2 --mem 256M`",
                    rng(boot.get("smolvmm_s")),
                    ratio(boot.get("smolvmm_s"), boot.get("qemu_s")),
                ],
                ["QEMU microvm (ACPI on) `-enable-kvm -cpu host -m 256M -smp 2`", rng(boot.get("qemu_s")), "1"],
            ],
        )
        + error_of(boot)
    )
    save = g.get("save", {})
    mib = 1 / (1 << 20)
    parts.append(
        "### Save a running guest to a file\n\n"
        + table(
            ["VMM", "seconds", "file MiB", "time ratio", "size ratio"],
            [
                [
                    "smolvmm `Machine.snapshot` (raw)",
                    rng(save.get("smolvmm_s")),
                    f"{save['smolvmm_file']['bytes'] * mib:.1f}" if "smolvmm_file" in save else "n/a",
                    ratio(save.get("smolvmm_s"), save.get("qemu_s")),
                    f"{save['smolvmm_file']['bytes'] / save['qemu_file']['bytes']:.2f}"
                    if "qemu_file" in save
                    else "n/a",
                ],
                [
                    'QEMU HMP `stop` + `migrate "exec:cat > FILE"` (max-bandwidth lifted)',
                    rng(save.get("qemu_s")),
                    f"{save['qemu_file']['bytes'] * mib:.1f}" if "qemu_file" in save else "n/a",
                    "1",
                    "1",
                ],
            ],
        )
        + error_of(save)
    )
    if save.get("smolvmm_phases_ms"):
        parts.append(
            "Where smolvmm's save goes (ms per phase, min / median / max):\n\n"
            + table(
                ["phase", "ms"],
                [[f"`{name}`", rng(value, digits=1)] for name, value in save["smolvmm_phases_ms"].items()],
            )
        )
    rest, api, helped = g.get("restore", {}), g.get("restore_api", {}), g.get("restore_helper", {})
    parts.append(
        "### Restore until the guest answers `echo` (s, process start → the answer)\n\n"
        + table(
            ["VMM", "seconds", "ratio to QEMU"],
            [
                [
                    "smolvmm `python -m smolvmm run BUNDLE` (new process)",
                    rng(rest.get("smolvmm_s")),
                    ratio(rest.get("smolvmm_s"), rest.get("qemu_s")),
                ],
                [
                    "smolvmm `Machine.restore` in a warm process (library; no interpreter start)",
                    rng(api.get("smolvmm_s")),
                    ratio(api.get("smolvmm_s"), rest.get("qemu_s")),
                ],
                ['QEMU `-incoming "exec:cat FILE"`, HMP `cont`, then `echo`', rng(rest.get("qemu_s")), "1"],
                ["(QEMU: of which spawn → `cont` acknowledged)", rng(rest.get("qemu_cont_s")), ""],
                [
                    "smolvmm `run BUNDLE` handed to a warm `smolvmm helper`",
                    rng(helped.get("smolvmm_s")),
                    ratio(helped.get("smolvmm_s"), helped.get("qemu_s")),
                ],
                ["QEMU `-incoming`, again, measured beside the helper's runs", rng(helped.get("qemu_s")), "1"],
            ],
        )
        + error_of(rest)
        + error_of(api)
        + error_of(helped)
    )
    timings = rest.get("smolvmm_timings") or []
    if timings:
        names = list(timings[0]["phases_ms"])
        cells = [
            rng({"min": min(v), "median": sorted(v)[len(v) // 2], "max": max(v)}, digits=0)
            for v in ([t["phases_ms"].get(n, 0) for t in timings] for n in names)
        ]
        parts.append(
            "smolvmm restore phases in the same runs (`run --timings`, ms since the restore began, "
            "min / median / max):\n\n" + table(names, [cells])
        )
    py = g.get("python_startup", {})
    if "python_c_pass_s" in py:
        parts.append(
            "Process start-up in the same machine (s):\n\n"
            + table(
                ["`python -c pass`", "`python -m smolvmm --help`", "`python -m smolvmm run --prepare-only BUNDLE`"],
                [[rng(py["python_c_pass_s"]), rng(py["smolvmm_help_s"]), rng(py["prepare_only_s"])]],
            )
        )
    mem = g.get("memory", {})
    per = [k for k in mem if k.endswith("_pss_mib")]
    counts = sorted({int(k.split("_")[1]) for k in per})
    rows = []
    for name in ("smolvmm", "qemu"):
        rows.append(
            [name]
            + [f"{mem[f'{name}_{n}_pss_mib']:.1f}" if f"{name}_{n}_pss_mib" in mem else "n/a" for n in counts]
            + [
                ("1" if name == "qemu" else f"{mem[f'smolvmm_{n}_pss_mib'] / mem[f'qemu_{n}_pss_mib']:.2f}")
                if f"qemu_{n}_pss_mib" in mem and f"smolvmm_{n}_pss_mib" in mem
                else "n/a"
                for n in counts
            ]
        )
    parts.append(
        "### Host memory of restored instances (sum of PSS, MiB, after each answered `echo`)\n\n"
        + table(["VMM", *(f"{n} instance(s)" for n in counts), *(f"ratio at {n}" for n in counts)], rows)
        + error_of(mem)
    )
    disk = g.get("disk", {})
    q, s = disk.get("qemu", {}), disk.get("smolvmm", {})
    rows = [
        [label, rng(s.get(key), digits=0), rng(q.get(key), digits=0), ratio(s.get(key), q.get(key))]
        for label, key in (
            ("sequential 1 MiB read, depth 1 (MiB/s)", "seqread_qd1_mib_s"),
            ("sequential 1 MiB write, depth 1 (MiB/s)", "seqwrite_qd1_mib_s"),
            ("random 4 KiB read, depth 1 (IOPS)", "randread_qd1_iops"),
            ("random 4 KiB read, depth 32 (IOPS)", "randread_qd32_iops"),
            ("random 4 KiB write, depth 1 (IOPS)", "randwrite_qd1_iops"),
            ("random 4 KiB write, depth 32 (IOPS)", "randwrite_qd32_iops"),
        )
    ]
    host = disk.get("host_file", {})
    parts.append(
        "### Guest disk (`bench/iops.c` in the guest, direct I/O on virtio-blk, the guest's clock; "
        "min / median / max)\n\n"
        + table(["load", "smolvmm", "QEMU", "ratio smolvmm / QEMU"], rows)
        + "\n\nThe host's own sequential 1 MiB reads, then writes with fsync, of a like file (MiB/s): "
        f"{rng(host.get('read_mib_s'), digits=0)}, then {rng(host.get('write_mib_s'), digits=0)}.\n" + error_of(disk)
    )
    tcp = g.get("tcp", {})
    q, s = tcp.get("qemu", {}), tcp.get("smolvmm", {})
    parts.append(
        "### Guest TCP (MiB/s, guest → host over a TAP device)\n\n"
        + table(
            ["smolvmm", "QEMU", "ratio smolvmm / QEMU"],
            [
                [
                    rng(s.get("tcp_mib_s"), digits=1),
                    rng(q.get("tcp_mib_s"), digits=1),
                    ratio(s.get("tcp_mib_s"), q.get("tcp_mib_s")),
                ]
            ],
        )
        + error_of(tcp)
    )
    return parts


def render_native(n: dict) -> list[str]:
    prep = n["prepare_only"]
    parts = [f"Native measures: {machine_line(n['machine'])}."]
    parts.append(
        f"### Host-side restore (`run --prepare-only`, {prep['process_s']['n']} processes; ms since the restore "
        "began, min / median / max)\n\n"
        + table(
            ["phase", "ms"],
            [[k, rng(v, digits=1)] for k, v in prep["phases_ms"].items()]
            + [["whole process (s)", rng(prep["process_s"], digits=3)]],
        )
    )
    rows = []
    for key, label in (
        ("import_help", "`python -X importtime -m smolvmm --help`"),
        ("import_run", "`python -X importtime -m smolvmm run --prepare-only BUNDLE`"),
    ):
        imp = n[key]
        loads = ", ".join(name for name, loaded in imp["loads"].items() if loaded) or "none of them"
        heavy = ", ".join(f"{name} {ms:.0f}" for name, ms in list(imp["heaviest_ms"].items())[:5])
        rows.append([label, rng(imp["total_ms"], digits=1), str(imp["modules"]), loads, heavy])
    parts.append(
        "### Import time (ms, sum of top-level cumulative import times, 5 runs)\n\n"
        + table(
            [
                "command",
                "import ms",
                "modules",
                "loads (of anyio, trio, cffi, construct, zstandard, smolvmm.monitor.vm, smolvmm.hypervisor.kvm)",
                "heaviest top-level (ms)",
            ],
            rows,
        )
        + f"\n\nWall time of the process: `python -c pass` {rng(n['python_c_pass_s'], 1000, 1)} ms; "
        f"`python -m smolvmm --help` {rng(n['help_s'], 1000, 1)} ms."
    )
    pack = n["pack"]
    parts.append(
        f"A real bundle (the restored one above): raw {pack['raw_bytes'] / (1 << 20):.1f} MiB, "
        f"`pack --zstd` {pack['zstd_bytes'] / (1 << 20):.1f} MiB "
        f"({pack['raw_bytes'] / pack['zstd_bytes']:.2f}× smaller) in {pack['pack_s']:.2f} s."
    )
    return parts


def render_usernet(u: dict) -> str:
    ours, theirs = u.get("smolvmm_tap_vhost", {}), u.get("qemu_tap_vhost", {})
    rows = [
        [label, rng(ours.get(key), digits=2), rng(theirs.get(key), digits=2), ratio(ours.get(key), theirs.get(key))]
        for label, key in (("guest → host", "to_host_mib_s"), ("host → guest", "to_guest_mib_s"))
    ]
    errors = "".join(f"\nFailed: `{error}`" for error in u.get("errors", []))
    return (
        f"### TCP over a TAP with vhost-net (MiB/s, {u['mib']} MiB per transfer, {u['runs']} runs; "
        f"{machine_line(u['machine'])})\n\n"
        + table(["direction", "smolvmm `--net tap=...,vhost=on`", "QEMU `-netdev tap,...,vhost=on`", "ratio"], rows)
        + errors
    )


def render_working_set(w: dict) -> str:
    r = w["results"]
    rows = []
    for cache in ("warm", "cold"):
        without, with_set = r.get(f"without_{cache}", {}), r.get(f"with_{cache}", {})
        rows.append(
            [
                f"{cache}: restore → first answer (s)",
                rng(without.get("seconds"), digits=3),
                rng(with_set.get("seconds"), digits=3),
                ratio(with_set.get("seconds"), without.get("seconds")),
            ]
        )
        for faults in ("major_faults", "minor_faults"):
            rows.append(
                [
                    f"{cache}: {faults.replace('_', ' ')}",
                    rng(without.get(faults), digits=0),
                    rng(with_set.get(faults), digits=0),
                    ratio(with_set.get(faults), without.get(faults)),
                ]
            )
    return (
        f"### The restore working set: first exec answer with and without its prefetch ({w['runs']} runs; "
        f"{machine_line(w['machine'])})\n\n"
        f"Working set {w['working_set_pages']} of {w['stored_pages']} stored pages.\n\n"
        + table(["measure", "without the section", "with it (prefetched)", "ratio with / without"], rows)
    )


def render_clones(c: dict) -> str:
    rows = [
        [
            str(row["count"]),
            f"{row['all_answered_s']:.2f}",
            f"{row['latency_median_s']:.2f} / {row['latency_max_s']:.2f}",
            f"{row['pss_mib']:.1f}",
            f"{row['pss_per_clone_mib']:.2f}",
        ]
        for row in c["rows"]
    ]
    return (
        f"### Clones restored at once by one process ({machine_line(c['machine'])})\n\n"
        + table(["clones", "all answered, s", "per clone: median / slowest, s", "PSS, MiB", "per clone, MiB"], rows)
        + "\n\nPlots: `plots/clones_latency.png`, `plots/clones_memory.png`; with RAM: "
        "`plots/save_scaling.png`, `plots/restore_scaling.png`."
    )


NESTED_RENDERERS = {"usernet": render_usernet, "working_set": render_working_set, "clones": render_clones}


def render(out: Path) -> str:
    parts = [f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python bench/run_all.py`."]
    if (out / "guest.json").exists():
        parts += render_guest(json.loads((out / "guest.json").read_text()))
    if (out / "native.json").exists():
        parts += render_native(json.loads((out / "native.json").read_text()))
    for name, (result, _) in NESTED_BENCHES.items():
        if (out / name / result).exists():
            parts.append(NESTED_RENDERERS[name](json.loads((out / name / result).read_text())))
        elif (out / name / "error.txt").exists():
            parts.append(f"### {name}\n\nFailed: `{(out / name / 'error.txt').read_text().strip()}`")
    for name, title in MARKDOWN_TITLES.items():
        if (out / f"{name}.md").exists():
            parts.append(f"### {title}\n\n" + (out / f"{name}.md").read_text().strip())
    return "\n\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/smolvmm-bench"), help="results directory")
    parser.add_argument("--runs", type=int, default=5, help="runs per guest measure (default 5)")
    parser.add_argument("--instances", type=int, default=10, help="restored instances for memory (default 10)")
    parser.add_argument("--native-runs", type=int, default=20, help="prepare-only runs (default 20)")
    parser.add_argument(
        "--reuse-guest",
        action="store_true",
        help="keep --out's guest.json and bundle from an earlier run; redo only the native part",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.reuse_guest:
        run_guest_part(out, args.runs, args.instances)
        run_nested_benches(out, args.runs)
    run_native_part(out, args.native_runs)
    tables = render(out)
    (out / "tables.md").write_text(tables)
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
