"""Host plumbing: guest memory mappings, eventfds, the cffi module, what /dev/kvm is, the jail."""
