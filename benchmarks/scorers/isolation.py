"""OS isolation for untrusted programs: bubblewrap namespaces, detected once per process.

Every candidate program runs as

    bwrap --unshare-all --unshare-user --uid 65534 --gid 65534 --cap-drop ALL
          --die-with-parent --new-session --ro-bind / / --proc /proc --dev /dev
          --size 64M --tmpfs /tmp (and /var/tmp, /run, /dev/shm, /root, /home, $HOME ...)
          --ro-bind <each input file> /tmp/sandbox/<name> --chdir /tmp/sandbox --clearenv --setenv ...

so it has no network (a fresh network namespace holds only a downed loopback), sees only its own
processes (a pid namespace: it cannot signal the evaluator, and everything in it dies with it),
runs as `nobody` with no capabilities (rlimits cannot be raised, RLIMIT_NPROC applies), reads
the system read-only, cannot see $HOME (tokens, caches, keys) or the evaluator's environment,
and writes only to a private /tmp of 64 MiB (its working folder included; its inputs are bound
read-only). The audit hook and rlimits of
`sandbox.PREAMBLE` stay on as an extra layer.

Where bubblewrap is missing or cannot create namespaces (some containers), untrusted code is
refused unless the caller passes `allow_unsafe=True` (`opd eval --allow-unsafe-code`), and
results record the isolation that was used.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from opdcli.errors import ConfigError

SANDBOX_DIR = "/tmp/sandbox"
"""The program's folder inside the sandbox (on the private /tmp: the root is read-only)."""
HIDDEN = ("/tmp", "/var/tmp", "/run", "/dev/shm", "/root", "/home", "/mnt", "/media", "/srv")
"""Paths replaced by empty private tmpfs folders inside the sandbox (when they exist)."""
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap; "
                "or run the scorer in a container, see docs/sandbox.md)")


@dataclass(frozen=True)
class Isolation:
    """What the host offers: kind "bwrap" (with its path) or "none" (with the reason)."""

    kind: str
    path: str = ""
    reason: str = ""

    @property
    def isolated(self) -> bool:
        return self.kind == "bwrap"


def _hidden_paths() -> list[str]:
    home = os.path.realpath(os.path.expanduser("~"))
    paths = [p for p in HIDDEN if os.path.isdir(p)]
    if home not in ("/", *paths) and os.path.isdir(home):
        paths.append(home)
    return paths


def _python_binds() -> list[str]:
    """Re-expose, read-only, the interpreter's own prefix where a hidden path covers it."""
    out: list[str] = []
    hidden = _hidden_paths()
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(os.path.dirname(sys.executable))}:
        if any(prefix == h or prefix.startswith(h + os.sep) for h in hidden):
            out += ["--ro-bind", prefix, prefix]
    return out


def bwrap_command(bwrap: str, work: Path, argv: list[str], env: dict[str, str], tmp_mb: int = 64) -> list[str]:
    """The bwrap command line that runs `argv` in SANDBOX_DIR, where the files of `work` are
    bound read-only; the only writable places are the private /tmp (SANDBOX_DIR included) and
    the other hidden paths, each a tmpfs of at most `tmp_mb` MiB."""
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
           "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    for path in _hidden_paths():
        cmd += ["--size", str(tmp_mb << 20), "--tmpfs", path]
    cmd += _python_binds()
    cmd += ["--dir", SANDBOX_DIR]
    for f in sorted(work.iterdir()):
        cmd += ["--ro-bind", str(f), f"{SANDBOX_DIR}/{f.name}"]
    cmd += ["--chdir", SANDBOX_DIR, "--clearenv"]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    return [*cmd, "--", *argv]


@functools.lru_cache(maxsize=1)
def detect() -> Isolation:
    """Probe bubblewrap once: it must start a program with every namespace and no capabilities."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Isolation("none", reason="bubblewrap (bwrap) is not installed")
    probe = Path(os.environ.get("TMPDIR", "/tmp"))
    try:
        with tempfile.TemporaryDirectory(prefix="opd-bwrap-probe-", dir=probe) as tmp:
            cmd = bwrap_command(bwrap, Path(tmp), [sys.executable, "-I", "-c",
                                                   "import os; print(os.getuid(), os.getpid())"],
                                {"PATH": os.defpath})
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return Isolation("none", reason=f"bwrap failed to start ({exc})")
    if done.returncode != 0 or done.stdout.split() != ["65534", "2"]:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}, output {done.stdout.strip()!r}"])[-1]
        return Isolation("none", reason=f"bwrap cannot create the sandbox here ({last[:200]})")
    return Isolation("bwrap", path=bwrap)


def require(allow_unsafe: bool) -> Isolation:
    """The isolation to run untrusted code with; without one, refuse unless `allow_unsafe`."""
    iso = detect()
    if not iso.isolated and not allow_unsafe:
        raise ConfigError(f"cannot run untrusted code safely: {iso.reason}; {INSTALL_HINT}, or pass "
                          "--allow-unsafe-code to run it with only rlimits and an audit hook (hostile code "
                          "can escape them; results record it)")
    return iso


def describe(iso: Isolation) -> str:
    """For results.json: what contained the candidate programs."""
    if iso.isolated:
        return "bwrap (user, pid, net, ipc, uts, cgroup namespaces; uid 65534; no capabilities; read-only root)"
    return f"none: rlimits and an audit hook only, UNSAFE for hostile code ({iso.reason})"
