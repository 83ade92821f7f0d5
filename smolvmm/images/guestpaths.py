"""Where an image machine's guest finds what smolvmm added to it (the initramfs of ``imageroot``
copies it there before switching into the image): known to the runner without the builder."""

TOOLS = "/run/smolvmm"  # in the guest, after the switch: busybox, tini, the agent, stage2
BUSYBOX = f"{TOOLS}/busybox"
RUNAS = f"{TOOLS}/smolvmm-runas"  # runas.c: switches to the image's User
# On the kernel command line (monitor/dhcp.py): where the guest keeps busybox and udhcpc's hook.
TOOLS_ARG = "smolvmm.tools"
