"""The exit statuses of every smolvmm command: one table, shown by ``smolvmm --help`` and the README."""

from __future__ import annotations

import signal

import smolvmm

OK = 0
ERROR = 1  # smolvmm could not do what was asked: host, image, hypervisor, I/O, a guest that timed out
USAGE = 2  # bad flags or arguments, or a configuration they describe that cannot be: nothing was started
BAD_BUNDLE = 3  # the bundle is missing, unreadable, invalid, or lacks what the command needs (verify's verdict)
GUEST_CRASHED = 4  # the guest crashed: a triple fault, or a vCPU or device that failed
SIGNAL_BASE = 128  # `run BUNDLE -- CMD`: CMD's own status, or 128 + N when signal N killed it
INTERRUPTED = SIGNAL_BASE + signal.SIGINT  # Ctrl-C
BROKEN_PIPE = SIGNAL_BASE + signal.SIGPIPE  # stdout closed early (`| head`): how other tools end then

TABLE = f"""\
exit status:
  {OK}    success (the guest powered off or rebooted; verify found no problem)
  {ERROR}    error: smolvmm could not do what was asked (host, image, hypervisor, I/O)
  {USAGE}    usage: bad flags, arguments or configuration; nothing was started
  {BAD_BUNDLE}    bad bundle: missing, unreadable or invalid, or it lacks what the command needs
  {GUEST_CRASHED}    the guest crashed (triple fault, a failed vCPU or device)
  {INTERRUPTED}  interrupted (Ctrl-C)
  {BROKEN_PIPE}  stdout closed early (| head), as other tools end then
  N    run BUNDLE -- CMD: CMD's own exit status; 128+N when signal N killed it"""


def for_exit(end: smolvmm.MachineExit) -> int:
    """The status for how a machine ended (a crash also gets its one line on stderr)."""
    if end.reason == smolvmm.ExitReason.CRASH:
        from smolvmm.cli import output as cli_output

        cli_output.error(f"the machine crashed: {end.detail}")
        return GUEST_CRASHED
    return OK


def leaf(exc: BaseException) -> BaseException:
    """The first error inside ``exc`` (task groups wrap them)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = next((e for e in exc.exceptions if not isinstance(e, BaseExceptionGroup)), exc.exceptions[0])
    return exc


def for_error(exc: BaseException) -> int:
    """The status for an error that ended a command."""
    if isinstance(exc, smolvmm.ConfigError):
        return USAGE
    if isinstance(exc, smolvmm.BundleError):
        return BAD_BUNDLE
    return ERROR
