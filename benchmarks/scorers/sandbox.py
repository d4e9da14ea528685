"""Run untrusted Python: OS isolation (bubblewrap, `isolation.py`) plus in-process limits.

Each run: a fresh folder as its only writable place, `python -I` with an almost empty
environment, inside bubblewrap namespaces (no network, own pid space, uid nobody, no
capabilities, read-only system, $HOME and the evaluator's environment invisible); a new session
whose process group is SIGKILLed afterwards and on timeout (and everything in the pid namespace
dies with it); a wall-clock timeout; stdout/stderr to files (RLIMIT_FSIZE caps runaway output;
both are read back capped). Before the candidate runs, a preamble sets RLIMIT_AS (memory),
RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC and RLIMIT_CORE, replaces `socket.socket` with a raising
stub and installs an audit hook (PEP 578) refusing sockets, new processes and writes outside the
folder: an extra layer only (ctypes and other tricks get past it, the namespaces do not).

Without bubblewrap, untrusted code is refused unless the caller allows it explicitly
(`allow_unsafe`), and then only the preamble's limits hold.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.scorers import isolation

MARK = "\x00OPD-RESULT\x00"

PREAMBLE = r'''
import json, os, resource, sys
_cfg = json.loads(sys.argv[1])
for _name, _value in (("RLIMIT_AS", _cfg["memory"]), ("RLIMIT_CPU", _cfg["cpu"]),
                      ("RLIMIT_FSIZE", _cfg["fsize"]), ("RLIMIT_NPROC", _cfg["nproc"]),
                      ("RLIMIT_CORE", 0)):
    try:
        resource.setrlimit(getattr(resource, _name), (_value, _value))
    except (ValueError, OSError, AttributeError):
        pass
import socket as _socket_mod, _socket
class _NoSocket:
    def __init__(self, *a, **k):
        raise PermissionError("network access is disabled in the sandbox")
_socket_mod.socket = _socket.socket = _NoSocket
_ROOT = os.path.realpath(os.getcwd())
_SAFE = {"/dev/null"}
def _outside(p):
    if isinstance(p, int) or p is None:
        return False
    p = os.fsdecode(p)
    real = os.path.realpath(p)
    return real not in _SAFE and not (real == _ROOT or real.startswith(_ROOT + os.sep))
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.symlink", "os.link",
                "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree",
                "shutil.copyfile", "shutil.move", "os.chdir", "os.chroot"}
_PROC_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn", "os.startfile"}
def _hook(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in the sandbox")
    if event in _PROC_EVENTS:
        raise PermissionError(event + " is disabled in the sandbox")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE)
        if writing and _outside(path):
            raise PermissionError("writing outside the sandbox directory: %r" % (path,))
    elif event in _PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and _outside(a):
                raise PermissionError(event + " outside the sandbox directory: %r" % (a,))
sys.addaudithook(_hook)
del _hook
_src = open("solution.py", encoding="utf-8").read()
if _cfg["mode"] == "stdin":
    _g = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(_cfg["header"] + _src, "solution.py", "exec"), _g)
else:
    exec(compile(_cfg["driver"], "driver.py", "exec"), {"__name__": "__driver__", "_src": _src, "_cfg": _cfg})
'''


@dataclass(frozen=True)
class RunResult:
    """How one sandboxed run ended."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool


@dataclass(frozen=True)
class Limits:
    wall_s: float = 6.0
    memory_mb: int = 1024
    fsize_mb: int = 64
    nproc: int = 0
    """0: the current task count of this user + 32 (threads are allowed, forks are hooked)."""
    allow_unsafe: bool = False
    """Run even where no OS isolation is available (`isolation.require`)."""


@functools.lru_cache(maxsize=2)
def user_tasks(isolated: bool = False) -> int:
    """Processes + threads of this user (RLIMIT_NPROC counts both); counted once per process.
    Inside the isolation the program holds no capabilities, so RLIMIT_NPROC applies even when
    the evaluator runs as root (it counts the host user's tasks)."""
    uid, total = os.getuid(), 0
    if uid == 0 and not isolated:  # root ignores RLIMIT_NPROC; the audit hook and the group kill remain
        return 4096
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip() or 1)
    return total


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, stdin: str, limits: Limits, mode: str = "stdin", header: str = "",
               driver: str = "", files: dict[str, str] | None = None) -> RunResult:
    """Run `code` as solution.py in a fresh folder under the limits, inside the OS isolation of
    `isolation.require` (bubblewrap; without it only with `limits.allow_unsafe`); never raises on the
    program's failure. stdout is capped at 4 MiB, stderr at its last 4000 characters."""
    iso = isolation.require(limits.allow_unsafe)
    nproc = limits.nproc or (user_tasks(iso.isolated) + 32 if sys.platform.startswith("linux") else 256)
    cfg = {"memory": limits.memory_mb << 20, "cpu": int(limits.wall_s) + 1, "fsize": limits.fsize_mb << 20,
           "nproc": nproc, "mode": mode, "header": header, "driver": driver}
    with tempfile.TemporaryDirectory(prefix="opd-sandbox-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        (work / "solution.py").write_text(code, encoding="utf-8")
        for name, text in (files or {}).items():
            (work / name).write_text(text, encoding="utf-8")
        (Path(tmp) / "stdin.txt").write_text(stdin, encoding="utf-8")
        home = isolation.SANDBOX_DIR if iso.isolated else str(work)
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home,
               "TMPDIR": home, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        argv = [sys.executable, "-I", "-c", PREAMBLE, json.dumps(cfg)]
        if iso.isolated:
            argv = isolation.bwrap_command(iso.path, work, argv, env, tmp_mb=max(64, 2 * limits.fsize_mb))
        with open(Path(tmp) / "stdin.txt", "rb") as fin, open(Path(tmp) / "out.txt", "wb") as fout, \
                open(Path(tmp) / "err.txt", "wb") as ferr:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=fin, stdout=fout, stderr=ferr,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)
            proc.wait()
        out = _read_capped(Path(tmp) / "out.txt", 4 << 20, head=True)
        err = _read_capped(Path(tmp) / "err.txt", 4000, head=False)
    return RunResult(None if timed_out else proc.returncode, out, err, timed_out)


def _read_capped(path: Path, limit: int, head: bool) -> str:
    """At most `limit` bytes of a file (its start or its end) without reading the rest."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(0 if head else max(0, size - limit))
        return fh.read(limit).decode("utf-8", "replace")
