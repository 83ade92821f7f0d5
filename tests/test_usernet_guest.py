"""User networking with real guests (nested KVM): port forwards into the guest, the guest reaching
the host's loopback through its gateway, four clones each with their own passt and ports, and a
flooding guest that slows only itself.

The nested machine has no network interface: the module moves the test process into a network
namespace of its own with one interface holding an address and a default route (a tap nobody
reads), which is all passt needs; every connection stays on this namespace's loopback.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from guests import GUEST_TIMEOUT, bounded, shell
from network import GATEWAY, HOST_ADDRESS, WIRE

from smolvmm import Machine, NetConfig, PortForward

pytestmark = [pytest.mark.kvm]
CLONE_NEWNET = 0x40000000


@pytest.fixture(scope="module")
def host_netns() -> Iterator[None]:
    """This thread (the one the tests and their event loops run on, and spawn passt from) in a
    fresh network namespace: loopback plus wire0 with an address and a default route."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    try:
        for command in WIRE:
            subprocess.run(["ip", *command.split()], check=True)
        yield
    finally:
        libc.setns(original, CLONE_NEWNET)
        os.close(original)


@pytest.fixture(scope="module")
def web_bundle(host_netns: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default guest built with ``--net user``: it took its address by DHCP from passt."""
    path = tmp_path_factory.mktemp("usernet") / "web.smolmachine"
    result = subprocess.run(
        [sys.executable, "-m", "smolvmm", "build", "-o", str(path), "--net", "user"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def host_server(host_netns: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An HTTP server on this namespace's 127.0.0.1 (a free port), serving 'from the host'."""
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_text("page from the host\n")
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import http.server, socketserver, sys\n"
            "s = socketserver.TCPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler)\n"
            "print(s.server_address[1], flush=True); s.serve_forever()",
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    yield int(server.stdout.readline())
    server.kill()
    server.wait()


async def http_get(port: int) -> str:
    """The body of GET / from 127.0.0.1:``port`` (in this namespace)."""
    with anyio.fail_after(GUEST_TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            response = b""
            try:
                while True:
                    response += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    return response.decode(errors="replace").split("\r\n\r\n", 1)[-1]


def passt_processes() -> list[str]:
    names = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/comm") as comm:
                names.append(comm.read().strip())
        except FileNotFoundError:
            continue
    return [name for name in names if name.startswith("passt")]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])  # the machine runs in the CLI, on its own event loop
async def test_run_forwards_a_host_port_to_the_guest_and_the_guest_reaches_the_host(
    web_bundle: Path, host_server: int
) -> None:
    command = [sys.executable, "-m", "smolvmm", "run", "--timings", "--net", "user,forward=18080:80", str(web_bundle)]
    async with await anyio.open_process(command) as process:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        script = (
            "mkdir -p /www; echo page from the guest > /www/index.html; httpd -p 80 -h /www; "
            "ip -4 addr show eth0; ip route; "
            f"echo fetched: $(wget -q -O - http://{GATEWAY}:{host_server}/); echo SETUP-''DONE\n"
        )
        await process.stdin.send(script.encode())
        output = b""
        with anyio.fail_after(GUEST_TIMEOUT):
            while b"SETUP-DONE" not in output:
                output += await process.stdout.receive()
        text = output.decode(errors="replace")
        assert f"inet {HOST_ADDRESS}/24" in text  # DHCP: the host's own address
        assert "mtu 65520" in text  # passt's MTU, taken from the lease
        assert f"default via {GATEWAY} dev eth0" in text  # ... and the host's gateway
        assert "fetched: page from the host" in text  # the gateway address is the host's loopback
        assert await http_get(18080) == "page from the guest\n"
        await process.stdin.send(b"poweroff -f\n")
        stderr = b""
        async for chunk in process.stderr:
            stderr += chunk
        assert await process.wait() == 0
    assert "smolvmm: forwarding host port 18080/tcp to guest port 80" in stderr.decode()
    assert '"forwards": "18080:80/tcp"' in stderr.decode()  # the --timings line
    assert passt_processes() == []


@pytest.mark.anyio
async def test_four_clones_each_forward_their_own_port_and_answer_with_their_own_hostname(
    web_bundle: Path, host_server: int
) -> None:
    network = (NetConfig(forwards=(PortForward(0, 80),)),)
    async with (
        Machine.restore(web_bundle, networks=network) as one,
        Machine.restore(web_bundle, networks=network) as two,
        Machine.restore(web_bundle, networks=network) as three,
        Machine.restore(web_bundle, networks=network) as four,
    ):
        clones = [one, two, three, four]
        ports = [clone.forwards[0].host for clone in clones]
        assert len(set(ports)) == 4 and all(ports)
        assert len(passt_processes()) == 4
        for index, clone in enumerate(clones):
            fetched = await shell(
                clone,
                f"hostname clone-{index}; mkdir -p /www; hostname > /www/index.html; httpd -p 80 -h /www; "
                f"wget -q -O - http://{GATEWAY}:{host_server}/",
            )
            assert fetched == "page from the host"  # TCP out of a fresh clone works at once
        # A GET that never ends fails with what each guest's kernel said of its virtio devices (a
        # broken ring says so there, and the nested plugin runs such a test again).
        async with bounded(*clones) as step:
            for index, port in enumerate(ports):
                step.now = f"GET / through clone {index}'s forward (host port {port})"
                assert await http_get(port) == f"clone-{index}\n"
        assert all("network_renewed" in clone.timings.phases for clone in clones)
    assert passt_processes() == []


@pytest.mark.anyio
async def test_a_guest_flooding_the_network_slows_only_itself(web_bundle: Path) -> None:
    sink = subprocess.Popen(  # reads and drops whatever the flooder sends to the host's loopback
        [
            sys.executable,
            "-c",
            "import socket\n"
            "s = socket.create_server(('127.0.0.1', 0)); print(s.getsockname()[1], flush=True)\n"
            "c, _ = s.accept()\nwhile c.recv(1 << 20): pass",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    sent = "cat /sys/class/net/eth0/statistics/tx_packets"
    async with Machine.restore(web_bundle) as flooder, Machine.restore(web_bundle) as quiet:
        # Small frames (MTU 576) as fast as the guest makes them, in the background.
        await shell(flooder, "ip link set eth0 mtu 576")
        before = int(await shell(flooder, sent))
        await shell(
            flooder, f"(dd if=/dev/zero bs=64k 2>/dev/null | nc {GATEWAY} {port} >/dev/null 2>&1 &); echo flooding"
        )
        # The quiet machine answers, round after round, until the flooder has sent 200 frames (under
        # nested TCG a guest makes a few hundred in 20 rounds, not tens of thousands; how many
        # depends on how busy the nested machine is, so the rounds follow the flood).
        flooded, rounds = 0, 0
        while flooded <= 200 and rounds < 200:
            for _ in range(5):
                assert await shell(quiet, f"echo round-{rounds}") == f"round-{rounds}"
                rounds += 1
            flooded = int(await shell(flooder, sent)) - before
        assert flooded > 200, (flooded, rounds)  # the flood ran all the while the quiet machine answered
    sink.kill()
    sink.wait()


@pytest.mark.anyio
async def test_a_clone_on_a_host_with_other_addresses_takes_them_before_it_is_handed_over(
    web_bundle: Path, host_server: int
) -> None:
    moved = {"address": "10.0.3.15", "gateway": "10.0.3.1"}
    readdress(moved["address"], moved["gateway"])
    try:
        async with Machine.restore(web_bundle) as clone:
            assert "network_renewed" in clone.timings.phases
            assert f"inet {moved['address']}/24" in await shell(clone, "ip -4 addr show eth0")
            fetched = await shell(clone, f"wget -q -O - http://{moved['gateway']}:{host_server}/")
            assert fetched == "page from the host"  # the new gateway is this host's loopback
    finally:
        readdress(HOST_ADDRESS, GATEWAY)


def readdress(address: str, gateway: str) -> None:
    """Give this namespace's wire0 another address and default route (a host on another network)."""
    for command in (
        "addr flush dev wire0",
        f"addr add {address}/24 dev wire0",
        f"route add default via {gateway} dev wire0 onlink",
    ):
        subprocess.run(["ip", *command.split()], check=True)
