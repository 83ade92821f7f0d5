"""arm64 guests: memory map, device tree, Image loading and the KVM vCPU/VGIC/timer state lists."""
