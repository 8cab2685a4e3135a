"""Building and loading the CPU backend's C++ extension (csrc/): compiled on first use, cached per machine.

What the extension computes is in :mod:`.ops` (the op table) and in the layers that call it (:mod:`.linear`,
:mod:`.screen`, :mod:`.layers`, :mod:`gptforge.backends.quant`); this module only builds and imports it.
At decode sizes what the C++ calls remove is the per-op cost of calling torch from Python, which is as
large as the matrix products (see benchmarks/README.md, "Decoding").

The extension is built with :func:`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja; the
``ninja`` package is a dependency; OpenMP, which GCC has, for the threads) the first time a layer asks for
it, once per machine, torch version and source: about 35 s on 2 cores, cached in
``$GPTFORGE_NATIVE_DIR`` (default ``~/.cache/gptforge/native``). If the build or the import fails, one
warning says why and every layer keeps its Python path. ``GPTFORGE_NATIVE=0`` skips the kernels
altogether.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
_ABI = 9  # must equal m.attr("ABI") in csrc/kernels.cpp
_lock = threading.Lock()
_state: dict = {}  # "module": the loaded extension or None once tried


def enabled() -> bool:
    """False when ``GPTFORGE_NATIVE`` is set to 0 / false / no / off."""
    return os.environ.get("GPTFORGE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def build_directory(source: Optional[Path] = None) -> Path:
    """Where the extension for this source (default :data:`SOURCE`), Python and torch is built and cached."""
    source = Path(source) if source is not None else SOURCE
    root = Path(os.environ.get("GPTFORGE_NATIVE_DIR") or Path.home() / ".cache" / "gptforge" / "native")
    flags = " ".join(_compile_flags() + _link_flags()).encode()
    digest = hashlib.sha256(source.read_bytes() + b"\0" + flags).hexdigest()[:12]
    torch_tag = torch.__version__.replace("+", "_")
    return root / f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch_tag}-{digest}"


def build(source: Optional[Path] = None, directory: Optional[Path] = None) -> ModuleType:
    """Compile (or reuse the cached build of) ``source`` (default :data:`SOURCE`) and import it.

    Raises whatever the compiler, ninja or the import raise.
    """
    from torch.utils import cpp_extension

    source = Path(source) if source is not None else SOURCE
    directory = Path(directory) if directory is not None else build_directory(source)
    directory.mkdir(parents=True, exist_ok=True)
    # The ninja that pip installs sits next to this interpreter, which need not be on PATH.
    bindir = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=bindir) is not None:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    name = "gptforge_native_" + directory.name.rsplit("-", 1)[-1]
    cached = any(directory.glob(name + "*.so"))
    if not cached:
        log.info("building gptforge's native CPU kernels (once per machine and torch version, ~35 s) in %s",
                 directory)
    start = time.perf_counter()
    with _build_lock(directory):
        module = cpp_extension.load(name=name, sources=[str(source)], build_directory=str(directory),
                                    extra_cflags=_compile_flags(), extra_ldflags=_link_flags(), verbose=False)
    if getattr(module, "ABI", None) != _ABI:
        raise RuntimeError(f"{source.name} reports ABI {getattr(module, 'ABI', None)}, expected {_ABI}")
    if not cached:
        log.info("built the native kernels in %.0f s", time.perf_counter() - start)
    return module


def _compile_flags() -> list[str]:
    # No contraction of a*b+c into fused multiply-adds: the kernels must round as torch's ops do (the
    # fused ones they want are written out). OpenMP: ATen's parallel_for is a header template that runs
    # on one thread unless the caller is compiled with it; the library it links is the libgomp that
    # torch already loaded (same soname), so there is one thread pool. Apple's clang has no -fopenmp.
    if os.name == "nt":
        return ["/O2", "/fp:precise", "/openmp"]
    return ["-O3", "-ffp-contract=off"] + ([] if sys.platform == "darwin" else ["-fopenmp"])


def _link_flags() -> list[str]:
    return [] if os.name == "nt" or sys.platform == "darwin" else ["-fopenmp"]


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Hold an OS file lock on ``directory`` while building, and clear a stale torch lock file.

    torch's builder marks a build in progress with a ``lock`` file and waits, forever, while one exists;
    a build killed midway (kill -9, an out-of-memory kill, a machine going down; Ctrl-C cleans up) leaves
    it behind, and every later run would hang. gptforge's builds take this ``flock`` first, which the OS
    releases when a process dies, so a ``lock`` file found while holding it belongs to no live gptforge
    build and is removed.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: keep torch's own locking
        yield
        return
    with open(directory / ".gptforge-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                log.warning("removing a stale build lock left by an interrupted build: %s", stale)
                stale.unlink()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load() -> Optional[ModuleType]:
    """The native kernels module, or None (disabled, or it could not be built; warned once)."""
    if not enabled():
        return None
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = build()
            except Exception as exc:  # no compiler, no ninja, other headers: keep the Python path
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log.warning("gptforge's native CPU kernels are unavailable (%s: %s); using the Python "
                            "path, which is slower at decode sizes. Set GPTFORGE_NATIVE=0 to skip the "
                            "attempt.", type(exc).__name__, first[:300])
                _state["module"] = None
        return _state["module"]
