"""virtio devices over the virtio-mmio transport: queue, mmio, blk (CoW), net (TAP), console, rng."""
