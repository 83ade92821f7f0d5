"""Container images as machine disks: ``source`` (oci:, docker-archive:, docker://, rootfs: sources,
their manifests and verified blobs), ``registry`` (pulling over the distribution API), ``layers``
(applying layer tars to a directory, refusing what would escape it), ``rootdisk`` (the ext4 base
disk, cached by image digest) and ``imageconfig`` (Env, WorkingDir, User, Entrypoint, Cmd)."""
