"""The guest's side of user networking: the leases a guest takes at boot and a clone renews."""

from __future__ import annotations

from smolvmm.images.guest import UDHCPC_SCRIPT, udhcpc_script
from smolvmm.monitor.dhcp import STILL_ASKING, dhcp_interfaces, renewal


def test_a_clone_renews_its_leases_with_its_guests_own_tools() -> None:
    demo = renewal("console=hvc0 smolvmm.dhcp=eth0,eth1", ("eth0", "eth1"))
    assert demo[:2] == ["/bin/sh", "-c"] and demo[2].startswith("[ -x /etc/smolvmm/udhcpc.script ] || exit 0; ")
    assert demo[2].count("udhcpc -s /etc/smolvmm/udhcpc.script -q -i eth1") == 2
    image = renewal("console=hvc0 smolvmm.dhcp=eth0 smolvmm.tools=/run/smolvmm", ("eth0",))
    assert image[:3] == ["/run/smolvmm/busybox", "sh", "-c"]
    assert "/run/smolvmm/busybox ip link set eth0 up" in image[3]
    assert "/run/smolvmm/busybox udhcpc -s /run/smolvmm/udhcpc.script" in image[3]
    assert f"exit {STILL_ASKING}" in image[3]
    assert renewal("smolvmm.tools=/x;reboot", ("eth0",))[0] == "/bin/sh"  # the bundle's cmdline is not trusted
    assert dhcp_interfaces("a smolvmm.dhcp=eth0,eth12,eth0;x,wlan0 b") == ("eth0", "eth12")


def test_the_image_guest_runs_udhcpc_hook_with_its_own_busybox() -> None:
    assert udhcpc_script() == UDHCPC_SCRIPT  # the demo guest's, unchanged
    hook = udhcpc_script("/run/smolvmm/busybox")
    assert hook.startswith("#!/run/smolvmm/busybox sh\n")
    commands = [line.strip() for line in hook.splitlines() if " ip " in f" {line.strip()}"]
    assert len(commands) == 6 and all("/run/smolvmm/busybox ip " in line for line in commands)
