"""Hostile programs against the code scorer's sandbox (bubblewrap namespaces + rlimits + audit
hook). Each program tries one way out; the test checks from outside that it failed: no marker
file on the host, the listening socket never reached, the victim process alive, no secret in
what comes back, the evaluator unharmed and fast. Skipped where the host has no bubblewrap;
`make test` installs it where apt is available."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from benchmarks.scorers import isolation
from benchmarks.scorers.sandbox import Limits, run_python
from opdcli.errors import ConfigError

pytestmark = pytest.mark.skipif(not isolation.detect().isolated,
                                reason=f"no OS isolation here: {isolation.detect().reason}")

SECRET = "opd-test-secret-7f3a9c"
LIMITS = Limits(wall_s=4.0, memory_mb=512, fsize_mb=8)


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Markers the programs try to create, a listening socket, a victim process, secrets."""
    # beside the checkout (visible, read-only, inside the sandbox unless it sits under a hidden path)
    marker_dir = Path(__file__).resolve().parents[1] / f".hostile-{os.getpid()}"
    marker_dir.mkdir(exist_ok=True)
    os.chmod(marker_dir, 0o777)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    reached = []

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                reached.append(1)
                conn.close()
            except OSError:
                pass

    stop = threading.Event()
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    secret_file = Path.home() / ".opd-test-token"
    secret_file.write_text(SECRET)
    monkeypatch.setenv("OPD_TEST_SECRET", SECRET)
    info = {"dir": str(marker_dir), "port": server.getsockname()[1], "victim": victim.pid,
            "secret_file": str(secret_file), "ppid": os.getpid()}
    yield info, reached, victim
    stop.set()
    server.close()
    victim.kill()
    victim.wait()
    secret_file.unlink(missing_ok=True)
    for f in marker_dir.iterdir():
        f.unlink()
    marker_dir.rmdir()


CTYPES = "import ctypes, ctypes.util; libc = ctypes.CDLL(None, use_errno=True)\n"

ATTACKS: dict[str, tuple[str, str]] = {
    # name: (class, program); {dir} {port} {victim} {secret_file} {ppid} are filled in
    "ctypes-fork-writes-later": ("process", CTYPES + """
pid = libc.fork()
if pid == 0:
    libc.setsid()
    import time; time.sleep(6)
    open("{dir}/late-child", "w").write("escaped")
    libc._exit(0)
print("parent done")
"""),
    "ctypes-system": ("process", CTYPES + 'libc.system(b"touch {dir}/system")\n'),
    "posixsubprocess-fork-exec": ("process", """
import _posixsubprocess, os
args = [b"/bin/sh", b"-c", b"touch {dir}/forkexec"]
try:
    _posixsubprocess.fork_exec(args, [b"/bin/sh"], True, (), None, None, -1, -1, -1, -1, -1, -1, -1, -1,
                               False, False, -1, None, None, None, -1, None, False)
except TypeError:
    _posixsubprocess.fork_exec(args, [b"/bin/sh"], True, (), None, None, -1, -1, -1, -1, -1, -1, -1, -1,
                               False, False, None, None, None, -1, None, False)
import time; time.sleep(1)
"""),
    "multiprocessing-spawn": ("process", """
import multiprocessing as mp
def f():
    open("{dir}/spawned", "w").write("x")
if __name__ == "__main__":
    mp.set_start_method("spawn")
    p = mp.Process(target=f); p.start(); p.join()
"""),
    "dir-fd-write": ("filesystem", """
import os
fd = os.open("{dir}", os.O_RDONLY)
os.close(os.open("dirfd", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
"""),
    "mkfifo-outside": ("filesystem", 'import os; os.mkfifo("{dir}/fifo")\n'),
    "sqlite-outside": ("filesystem", """
import sqlite3
c = sqlite3.connect("{dir}/escape.db"); c.execute("create table t(x)"); c.commit()
"""),
    "ctypes-open-outside": ("filesystem", CTYPES + """
fd = libc.open(b"{dir}/ctypes-open", 0o101, 0o644)
libc.write(fd, b"x", 1)
"""),
    "chdir-race": ("filesystem", """
import os, threading
def flip():
    for _ in range(20000):
        try:
            os.chdir("{dir}"); os.chdir("/tmp/sandbox")
        except Exception:
            pass
t = threading.Thread(target=flip); t.start()
for i in range(20000):
    try:
        open("race-%d" % (i % 5), "w").close()
    except Exception:
        pass
t.join()
"""),
    "write-system-dirs": ("filesystem", """
for p in ("/etc/opd-escape", "/usr/opd-escape", "{dir}/../opd-escape-{ppid}"):
    try:
        open(p, "w").write("x")
    except OSError:
        pass
"""),
    "remount-root-rw": ("filesystem", CTYPES + """
MS_REMOUNT, MS_BIND = 32, 4096
r = libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND, None)
open("/opd-remounted", "w").write("x")
"""),
    "hook-globals-tamper-then-socket": ("network", """
import sys
g = sys._getframe(1).f_globals if sys._getframe(1) else dict()
for k in list(g):
    if k.startswith("_") and k not in ("__name__", "__builtins__"):
        g[k] = None
import _socket
s = _socket.socket(); s.connect(("127.0.0.1", {port}))
"""),
    "gc-code-swap-then-socket": ("network", """
import gc, sys
for obj in gc.get_objects():
    if callable(obj) and getattr(obj, "__name__", "") == "_hook":
        obj.__code__ = (lambda event, args: None).__code__
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
"""),
    "ctypes-socket": ("network", CTYPES + """
import struct
fd = libc.socket(2, 1, 0)
addr = struct.pack("<HH4s8x", 2, __import__("socket").htons({port}), bytes([127, 0, 0, 1]))
libc.connect(fd, addr, len(addr))
"""),
    "kill-parent": ("evaluator", CTYPES + """
import os, signal
libc.kill(os.getppid(), 9)
libc.kill({ppid}, 9)
"""),
    "kill-victim": ("evaluator", CTYPES + "libc.kill({victim}, 9)\n"),
    "pidfd-kill-victim": ("evaluator", CTYPES + """
fd = libc.syscall(434, {victim}, 0)
libc.syscall(424, fd, 9, None, 0)
"""),
    "read-environment": ("secrets", """
import os
print(dict(os.environ))
for p in ("/proc/1/environ", "/proc/{ppid}/environ", "/proc/self/environ", "{secret_file}"):
    try:
        print(open(p, "rb").read())
    except OSError as e:
        print("no", p, e)
import sys; sys.stderr.write(open("{secret_file}").read())
"""),
    "raise-rlimits": ("limits", """
import resource
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
b = bytearray(3 << 30)
open("{dir}/raised", "w").write("x")
"""),
    "fork-bomb": ("limits", CTYPES + """
while True:
    libc.fork()
"""),
    "disk-bomb-private-tmp": ("limits", """
i = 0
while True:
    open("/tmp/fill-%d" % i, "wb").write(b"x" * (7 << 20)); i += 1
"""),
    "huge-output": ("limits", """
import sys
while True:
    sys.stdout.write("y" * 65536)
"""),
}


def _markers(d: str) -> list[str]:
    return sorted(os.listdir(d))


def _run(program: str, info: dict) -> tuple:
    code = textwrap.dedent(program).format(**info)
    start = time.monotonic()
    result = run_python(code, "", LIMITS)
    return result, time.monotonic() - start


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_hostile_program_is_contained(host, name):
    info, reached, victim = host
    result, took = _run(ATTACKS[name][1], info)
    time.sleep(0.1 if name != "ctypes-fork-writes-later" else 7.0)  # a detached child would write by now
    assert _markers(info["dir"]) == [], (name, result.stderr[-500:])
    assert not reached, f"{name} reached the host's socket"
    assert victim.poll() is None, f"{name} killed a host process"
    assert SECRET not in result.stdout and SECRET not in result.stderr, name
    assert not Path("/etc/opd-escape").exists() and not Path("/opd-remounted").exists()
    assert took < LIMITS.wall_s + 10, (name, took)
    assert len(result.stdout) <= 4 << 20 and len(result.stderr) <= 4000


def test_every_class_of_attack_is_covered():
    assert {c for c, _ in ATTACKS.values()} == {"process", "filesystem", "network", "evaluator", "secrets",
                                                 "limits"}


def test_a_plain_program_still_runs(tmp_path):
    result = run_python("import sys; print(sum(map(int, sys.stdin.read().split())))", "2 3", LIMITS)
    assert (result.returncode, result.stdout.strip()) == (0, "5")


def test_without_isolation_untrusted_code_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setattr(isolation, "detect", lambda: isolation.Isolation("none", reason="testing"))
    with pytest.raises(ConfigError, match="cannot run untrusted code safely: testing.*--allow-unsafe-code"):
        run_python("print(1)", "", LIMITS)
    import dataclasses

    result = run_python("print(1)", "", dataclasses.replace(LIMITS, allow_unsafe=True))
    assert result.stdout.strip() == "1"
    assert "UNSAFE" in isolation.describe(isolation.detect())


def test_kill_everything_it_can_see_leaves_the_host_alone(host):
    """kill(-1, SIGKILL) and killpg(0): inside its pid namespace the program can reach only its
    own processes, so the victim and the evaluator live on and the run simply ends."""
    info, _, victim = host
    result = run_python(CTYPES + "libc.kill(-1, 9)\nprint('after kill -1', flush=True)\nlibc.kill(0, 9)\n"
                        "print('still here')", "", LIMITS)  # ctypes: past the audit hook
    assert victim.poll() is None, "a host process was killed"
    assert result.returncode is not None and not result.timed_out
    assert "after kill -1" in result.stdout  # kill(-1) reached no process it could not see
    assert "still here" not in result.stdout  # its own group did die
