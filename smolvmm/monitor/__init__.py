"""The machine monitor: a Machine and the tasks that run it (vCPUs, devices), cold boot, restore and snapshot."""
