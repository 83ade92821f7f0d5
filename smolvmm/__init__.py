"""smolvmm: a virtual machine monitor whose machines start from a snapshot in a fraction of a second."""
