"""cffi declarations compiled once into an out-of-line module, so later processes skip the C parser.

Parsing declarations (``FFI.cdef``) imports pycparser and lexes the C text: about a sixth of the
monitor's start-up. The first process writes the parsed types as a small Python module under
``$XDG_CACHE_HOME/smolvmm/ffi`` (keyed by the declarations and the cffi version); every later one
imports that. Where the cache cannot be written, the declarations are parsed in process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any

import cffi

from smolvmm.config import cache_root


def _parsed(cdef: str) -> Any:
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    return ffi


def declare(name: str, cdef: str) -> Any:
    """An FFI with ``cdef`` declared (an out-of-line ABI-mode FFI from the cache when possible)."""
    key = hashlib.sha256(f"{cffi.__version__}\0{cdef}".encode()).hexdigest()[:16]
    module_name = f"_smolvmm_ffi_{name}_{key}"
    path = cache_root() / "ffi" / f"{module_name}.py"
    if not path.exists():
        try:
            import tempfile  # only the first process writes the cache

            path.parent.mkdir(parents=True, exist_ok=True)
            builder = cffi.FFI()
            builder.cdef(cdef)
            builder.set_source(module_name, None, compiler_verbose=False)  # no "generating ..." on stdout
            fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            try:
                builder.emit_python_code(partial)
                os.replace(partial, path)
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
            return builder
        except OSError:
            return _parsed(cdef)
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (OSError, SyntaxError, ImportError, AttributeError):
        path.unlink(missing_ok=True)  # a damaged cache file: the next process writes it again
        return _parsed(cdef)
    return module.ffi
