"""C helpers compiled with cffi on first use and kept under ``${XDG_CACHE_HOME:-~/.cache}/smolvmm/native``.

Each module is keyed by its C source and declarations, cffi's version and the interpreter's, so a
change to any of them builds a new one. Where no C compiler or Python headers are found (or the
cache cannot be written), ``compiled`` returns None and the caller uses its Python path.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import cffi


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "smolvmm" / "native"


def _build(path: Path, module_name: str, cdef: str, source: str) -> None:
    import tempfile

    builder = cffi.FFI()
    builder.cdef(cdef)
    builder.set_source(module_name, source, extra_compile_args=["-O2"])
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as work:
        built = builder.compile(tmpdir=work, verbose=False)
        os.replace(built, path)


def compiled(prefix: str, cdef: str, source: str) -> Any | None:
    """The cffi module ``prefix_<key>`` of ``source`` declaring ``cdef``, built into the cache first
    if needed; None where it cannot be built or loaded."""
    import importlib.machinery
    import importlib.util

    abi = importlib.machinery.EXTENSION_SUFFIXES[0]  # sysconfig's EXT_SUFFIX, without importing sysconfig
    key = hashlib.sha256(f"{cffi.__version__}\0{sys.version}\0{cdef}\0{source}".encode()).hexdigest()[:16]
    module_name = f"{prefix}_{key}"
    path = cache_dir() / f"{module_name}{abi}"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _build(path, module_name, cdef, source)
        loader = importlib.machinery.ExtensionFileLoader(module_name, str(path))
        spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except Exception:  # no compiler, no headers, a read-only cache: the caller's Python path does the work
        return None
