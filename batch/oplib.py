"""The operator library of the fused CPU path (`fused_ops.c`): compiled on first use with the
machine's C compiler (`$CC`, which may carry arguments, else `cc`) and `-march=native`, into a
cache folder private to the user (`$NCF_CACHE_DIR`, else `~/.cache/ncf`), keyed by the source,
the compiler, the CPU and the ONNX Runtime version. One builder at a time (a file lock); a
build is installed only after `python -m batch.fused <library>` (a child process, so that a
crash cannot take the caller down) has compared both operators with numpy. Failures that would
repeat (the compiler rejects the source, the self-check disagrees or crashes) are remembered in
a `.bad` file next to where the library would be; passing ones (timeouts) are retried next
time. Every failure becomes a note, never an exception: the plain graph then runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("fused_ops.c")
_TIMEOUT_S = 120


@dataclass(frozen=True)
class Library:
    path: Path | None
    note: str


_library: Library | None = None


def cache_dir() -> Path:
    if os.environ.get("NCF_CACHE_DIR"):
        return Path(os.environ["NCF_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ncf"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler() -> tuple[list[str] | None, str]:
    """(command, version line) of $CC (which may carry arguments, e.g. "ccache cc") or cc."""
    cc = shlex.split(os.environ.get("CC") or "cc") or ["cc"]
    path = shutil.which(cc[0])
    if path is None:
        return None, f"no C compiler ({cc[0]}) on PATH"
    command = [path, *cc[1:]]
    try:
        version = subprocess.run([*command, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{cc[0]} --version failed: {exc}"
    return command, version.splitlines()[0] if version else " ".join(cc)


def library() -> Library:
    """The compiled operator library (built and self-checked once per machine), or the reason
    there is none. Cached in-process."""
    global _library
    if _library is None:
        try:
            _library = _build()
        except (OSError, RuntimeError) as exc:  # no home directory, unreadable cache, ...
            _library = Library(None, f"fused operators unavailable: {exc}")
    return _library


class _Failure(Exception):
    """Building failed; `lasting` failures (the compiler rejects the source, the self-check
    disagrees with numpy or crashes) are remembered, passing ones (timeouts) are not."""

    def __init__(self, reason: str, lasting: bool):
        super().__init__(reason)
        self.lasting = lasting


def _private_folder(folder: Path) -> None:
    """Create the cache folder for this user only, and refuse one that others could write to:
    a library found there is loaded into the process."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise OSError(f"cache folder {folder} is not private to this user (owner or group/world write)")


def _build() -> Library:
    if os.environ.get("NCF_FUSED", "1") == "0":
        return Library(None, "fused operators disabled (NCF_FUSED=0)")
    cc, version = _compiler()
    if cc is None:
        return Library(None, f"fused operators unavailable: {version}")
    import onnxruntime as ort

    # a new source, compiler, CPU or runtime gets its own build and its own self-check
    signature = f"{version}\n{_cpu_signature()}\n{ort.__version__}".encode()
    key = hashlib.sha256(SOURCE.read_bytes() + signature).hexdigest()[:16]
    folder = cache_dir()
    _private_folder(folder)
    target = folder / f"fused_ops-{key}.so"
    bad = target.with_suffix(".bad")
    with _lock(folder / f"fused_ops-{key}.lock"):  # one builder per machine; the others wait
        if bad.exists():
            return Library(None, f"fused operators unavailable: {bad.read_text().strip()} (delete {bad} to retry)")
        if target.exists():
            return Library(target, "")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / target.name
            try:
                _compile(cc, built)
                _self_check(built)
            except _Failure as failure:
                if failure.lasting:
                    bad.write_text(f"{failure}\n")
                return Library(None, f"fused operators unavailable: {failure}")
            os.replace(built, target)
    return Library(target, "compiled now")


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builders still each install a complete file
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _compile(cc: list[str], out: Path) -> None:
    errors = ""
    for flags in (["-march=native"], []):  # some compilers (or CPUs) lack -march=native
        try:
            run = subprocess.run([*cc, *flags, "-O3", "-shared", "-fPIC", "-o", str(out), str(SOURCE)], check=False,
                                 capture_output=True, text=True, timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise _Failure(f"the compiler ran longer than {_TIMEOUT_S}s", lasting=False) from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise _Failure(f"compiler failed to run: {exc}", lasting=False) from exc
        if run.returncode == 0:
            return
        errors = (run.stderr.strip().splitlines() or ["?"])[-1]
    raise _Failure(f"compile error: {errors}", lasting=True)


def _self_check(lib: Path) -> None:
    """Run both operators on small random cases in a child process (a crash there cannot take
    the caller down) and compare them with numpy."""
    try:
        run = subprocess.run([sys.executable, "-m", "batch.fused", str(lib)], check=False, capture_output=True, text=True,
                             timeout=_TIMEOUT_S, cwd=str(Path(__file__).resolve().parents[1]))
    except subprocess.TimeoutExpired:
        raise _Failure(f"the self-check ran longer than {_TIMEOUT_S}s", lasting=False) from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Failure(f"self-check did not run: {exc}", lasting=False) from exc
    if run.returncode != 0:
        last = (run.stderr.strip() or run.stdout.strip() or f"exit code {run.returncode}").splitlines()[-1]
        raise _Failure(f"self-check failed: {last}", lasting=True)


def session_options(lib: Path):
    """Session options of a CPU session that can run the library's operators."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(str(lib))
    return so
