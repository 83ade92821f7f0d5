"""Host plumbing: guest memory mappings, eventfds, the cffi module, the cache directory, what /dev/kvm is, the jail."""
