"""python -m smolvmm (and the ``smolvmm`` script): the CLI; a ``run`` goes to this user's warm
helper when one serves (``smolvmm helper``), else everything runs here."""

import sys

from smolvmm.cli import expand


def entry() -> int:
    """The command line's exit status."""
    argv = expand(sys.argv[1:])
    if argv and argv[0] == "run":
        from smolvmm.cli.handoff import hand_off

        status = hand_off(argv)
        if status is not None:
            return status
    from smolvmm.cli.dispatch import main

    return main(argv)


if __name__ == "__main__":
    raise SystemExit(entry())
