"""Shipping bundles through OCI registries (spec/registry.md): ``push``, ``pull``, references,
the distribution API client and the local content store."""
