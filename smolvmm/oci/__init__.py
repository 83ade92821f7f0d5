"""Container images as machine disks: ``manifest`` (the image documents, checked), ``source`` (oci:,
docker-archive:, docker://, rootfs: sources and their verified blobs), ``registry`` (pulling over
the distribution API), ``layers`` (applying layer tars to a directory, refusing what would escape
it), ``rootdisk`` (the ext4 base disk, cached by image digest) and ``imageconfig`` (Env,
WorkingDir, User, Entrypoint, Cmd)."""
