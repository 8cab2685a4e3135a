"""Building and loading the CPU backend's C++ extension (csrc/): compiled on first use, cached per machine.

What the extension computes is in :mod:`.ops` (the op table) and in the layers that call it (:mod:`.linear`,
:mod:`.screen`, :mod:`.layers`, :mod:`gptforge.backends.quant`); this module only builds and imports it.
At decode sizes what the C++ calls remove is the per-op cost of calling torch from Python, which is as
large as the matrix products (see benchmarks/README.md, "Decoding").

The extension is built with :func:`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja; the
``ninja`` package is a dependency; OpenMP, which GCC has, for the threads) the first time a layer asks for
it, once per checkout, venv and source (:func:`build_directory` has the whole key): about 40 s on 2
cores, cached in ``$GPTFORGE_NATIVE_DIR`` (default ``~/.cache/gptforge/native``); a build says so in one
line. If the build or the import fails, one
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
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "extension.cpp"]  # one translation unit that includes each concern's file (see it)
_ABI = 9  # must equal m.attr("ABI") in csrc/bindings.cpp
_lock = threading.Lock()
_state: dict = {}  # "module": the loaded extension or None once tried


def enabled() -> bool:
    """False when ``GPTFORGE_NATIVE`` is set to 0 / false / no / off."""
    return os.environ.get("GPTFORGE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _as_sources(sources: Optional[Path | Sequence[Path]]) -> list[Path]:
    if sources is None:
        return list(SOURCES)
    return [Path(sources)] if isinstance(sources, (str, Path)) else [Path(s) for s in sources]


def _inputs(sources: list[Path]) -> list[Path]:
    """The sources and the C++ files beside them (the headers and the files a source includes): every file
    whose change changes the binary."""
    beside = {f for folder in {s.parent for s in sources} for pattern in ("*.h", "*.cpp") for f in folder.glob(pattern)}
    return sorted(set(sources) | beside)


def _ninja() -> Optional[str]:
    """The ninja binary torch's builder will run: on PATH, else the one pip installed next to this
    interpreter (which need not be on PATH)."""
    return shutil.which("ninja") or shutil.which("ninja", path=os.path.dirname(sys.executable))


def _binary_id(path: Optional[str]) -> str:
    """A binary's resolved path, size and modification time (a reinstalled tool reads as another one)."""
    if path is None:
        return "none"
    real = os.path.realpath(path)
    try:
        stat = os.stat(real)
    except OSError:
        return real
    return f"{real}:{stat.st_size}:{stat.st_mtime_ns}"


def build_directory(sources: Optional[Path | Sequence[Path]] = None) -> Path:
    """Where the extension for these sources (default :data:`SOURCES`) is built and cached: one folder per
    everything that changes the binary or makes torch's builder start again (the sources and headers, by
    content and place; the flags; this torch install and version; this Python; the compiler; ninja), so a
    second venv or checkout builds beside the first instead of over it."""
    sources = _as_sources(sources)
    root = Path(os.environ.get("GPTFORGE_NATIVE_DIR") or Path.home() / ".cache" / "gptforge" / "native")
    key = hashlib.sha256()
    for path in sources:  # which files are compiled (the files beside them may be included)
        key.update(str(path.resolve()).encode() + b"\0")
    for path in _inputs(sources):
        key.update(str(path.resolve()).encode() + b"\0" + path.read_bytes() + b"\0")
    compiler = os.environ.get("CXX") or "c++"
    for part in (" ".join(_compile_flags() + _link_flags()), torch.__version__, os.path.dirname(torch.__file__),
                 sys.version, sys.executable, _binary_id(shutil.which(compiler)), compiler, _binary_id(_ninja())):
        key.update(part.encode() + b"\0")
    torch_tag = torch.__version__.replace("+", "_")
    return root / f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch_tag}-{key.hexdigest()[:12]}"


def _up_to_date(directory: Path, name: str, sources: list[Path]) -> bool:
    """Whether ninja will find the build done: the library is there and newer than every input (as ninja
    compares them; the folder's key covers the flags and tools, which ninja also checks)."""
    built = [p.stat().st_mtime_ns for p in directory.glob(name + "*.so")]
    return bool(built) and max(built) >= max(p.stat().st_mtime_ns for p in _inputs(sources))


def build(sources: Optional[Path | Sequence[Path]] = None, directory: Optional[Path] = None) -> ModuleType:
    """Compile (or reuse the cached build of) ``sources`` (default :data:`SOURCES`) and import it.

    A build that actually compiles says so in one WARNING-level line before it starts (the wait is long,
    and a WARNING reaches a person even where no logging is configured, through Python's last-resort
    handler); how long it took is logged at DEBUG. Raises whatever the compiler, ninja or the import raise.
    """
    from torch.utils import cpp_extension

    sources = _as_sources(sources)
    directory = Path(directory) if directory is not None else build_directory(sources)
    directory.mkdir(parents=True, exist_ok=True)
    ninja = _ninja()
    if ninja is not None and shutil.which("ninja") is None:
        os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + os.environ.get("PATH", "")
    name = "gptforge_native_" + directory.name.rsplit("-", 1)[-1]
    start = time.perf_counter()
    with _build_lock(directory):
        cached = _up_to_date(directory, name, sources)
        if not cached:
            log.warning("building gptforge's native CPU kernels, about 40 s on 2 cores, once per checkout, venv "
                        "and source (in %s)", directory)
        module = cpp_extension.load(name=name, sources=[str(s) for s in sources], build_directory=str(directory),
                                    extra_cflags=_compile_flags(), extra_ldflags=_link_flags(), verbose=False)
    if getattr(module, "ABI", None) != _ABI:
        raise RuntimeError(f"the native kernels report ABI {getattr(module, 'ABI', None)}, expected {_ABI}")
    if not cached:
        log.debug("built the native kernels in %.0f s", time.perf_counter() - start)
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
