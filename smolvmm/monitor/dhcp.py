"""The guest's side of user networking: ``smolvmm.dhcp=eth0,...`` on the kernel command line names
the interfaces that take a lease from passt at boot (the demo and image guests honour it), and a
restored clone renews those leases through the guest agent with the command ``renewal`` gives.

A guest that keeps its busybox and udhcpc hook outside its root's ``/bin`` and ``/etc/smolvmm``
(the image guest: the image's files stay as they were) says where with ``smolvmm.tools=DIR``.
"""

from __future__ import annotations

import re

from smolvmm.images.guestpaths import TOOLS_ARG

DHCP_ARG = "smolvmm.dhcp"
RENEW_TIMEOUT = 30.0
STILL_ASKING = 75  # the renewal's exit status when its udhcpc went on in the background
_HOOK = "udhcpc.script"


def _argument(cmdline: str, name: str) -> str | None:
    return next((word.partition("=")[2] for word in cmdline.split() if word.startswith(name + "=")), None)


def dhcp_interfaces(cmdline: str) -> tuple[str, ...]:
    """The interfaces a guest booted with ``cmdline`` takes a DHCP lease on (from passt)."""
    names = _argument(cmdline, DHCP_ARG) or ""
    return tuple(name for name in names.split(",") if re.fullmatch(r"eth\d{1,3}", name))


def renewal(cmdline: str, interfaces: tuple[str, ...]) -> list[str]:
    """The argv that renews the leases of ``interfaces`` in a guest booted with ``cmdline``: each
    link down and up (dropping the old network's routes and neighbours), then a lease within 5 s;
    else udhcpc goes on asking in the background and the command exits ``STILL_ASKING``. A guest
    without the hook (one of the user's own) exits 0 at once."""
    tools = _argument(cmdline, TOOLS_ARG)
    if tools is not None and re.fullmatch(r"/[\w./-]{1,200}", tools):
        shell, busybox, hook = [f"{tools}/busybox", "sh"], f"{tools}/busybox ", f"{tools}/{_HOOK}"
    else:
        shell, busybox, hook = ["/bin/sh"], "", f"/etc/smolvmm/{_HOOK}"
    udhcpc = f"{busybox}udhcpc -s {hook} -q"
    script = "; ".join(
        f"{busybox}ip link set {name} down && {busybox}ip link set {name} up && "
        f"{{ {udhcpc} -i {name} -n -t 5 -T 1 >/dev/null 2>&1 || "
        f"{{ {udhcpc} -i {name} -b -T 1 -A 2 >/dev/null 2>&1; exit {STILL_ASKING}; }}; }}"
        for name in interfaces
    )
    return [*shell, "-c", f"[ -x {hook} ] || exit 0; {script}"]
