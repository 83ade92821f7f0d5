"""arm64 guests: memory map, device tree, Image loading, the KVM vCPU/VGIC/timer register lists and
the state a snapshot holds."""
