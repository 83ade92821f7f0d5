"""The minimal guest kernel: the project's configuration and its build from Debian's source."""
