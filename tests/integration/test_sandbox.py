"""The python sandbox, for real: functional checks, then attacks judged by their host-side effect.

Nothing here is skipped: the development and CI machines have every isolation primitive, so a
missing one is a failure. Each attack asserts that its effect did not happen on the host, that
the sandbox still answers a trivial request afterwards, and that no process of a sandbox uid is
left outside a zygote.
"""

from __future__ import annotations

import ast
import hashlib
import io
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from string import Template
from typing import Any

import pytest
from PIL import Image as PILImage

from axpo.contracts.domain import ToolErrorKind
from axpo_tools.sandbox import PythonSandbox, RunResult, SandboxLimits, SandboxUnavailableError
from axpo_tools.sandbox.uids import uid_processes

pytestmark = pytest.mark.integration

SECRET = f"axpo-secret-{uuid.uuid4().hex}"
LIMITS = SandboxLimits(wall_s=5.0, cpu_s=5.0, memory_bytes=768 << 20, tmp_bytes=48 << 20)
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
TIMEOUT_SLACK_S = 1.5


def png(width: int = 32, height: int = 16, color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sandbox() -> Iterator[PythonSandbox]:
    with pytest.MonkeyPatch.context() as mp:
        # Set in the server's environment before the sandbox exists: it must never leak.
        mp.setenv("AXPO_SECRET", SECRET)
        assert PythonSandbox.check_isolation() == []
        with PythonSandbox(LIMITS, workers=2) as box:
            yield box


class _Listener:
    """A real TCP (and UDP) server on the host's loopback that counts what reaches it."""

    def __init__(self) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.udp.setblocking(False)
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.tcp.settimeout(0.05)
        while not self.stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def datagrams(self) -> int:
        count = 0
        while True:
            try:
                self.udp.recv(65536)
            except BlockingIOError:
                return count
            count += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.tcp.close()
        self.udp.close()


@dataclass
class Host:
    """What the attacks aim at, and how to look at it from the host."""

    listener: _Listener
    victim: subprocess.Popen[bytes]
    secret_file: Path
    marker: str
    passwd_digest: str
    numpy_digest: str

    def values(self) -> dict[str, Any]:
        return {
            "port": self.listener.port,
            "victim": self.victim.pid,
            "server": os.getpid(),
            "secret_file": str(self.secret_file),
            "marker": self.marker,
            "site": SITE_PACKAGES,
            "repo": str(Path(__file__).resolve().parents[2]),
        }


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    secret_file = tmp_path_factory.mktemp("host") / "secret.txt"
    secret_file.write_text(SECRET)
    listener = _Listener()
    victim = subprocess.Popen(["sleep", "300"])
    marker = f"/tmp/axpo-sandbox-escape-{uuid.uuid4().hex}"
    yield Host(
        listener=listener,
        victim=victim,
        secret_file=secret_file,
        marker=marker,
        passwd_digest=file_digest("/etc/passwd"),
        numpy_digest=file_digest(os.path.join(SITE_PACKAGES, "numpy", "__init__.py")),
    )
    victim.kill()
    victim.wait()
    listener.close()
    assert not os.path.exists(marker)


def assert_healthy(box: PythonSandbox) -> None:
    """The sandbox still answers, and nothing of a sandbox uid lives outside a zygote."""
    result = box.run("print('still here')")
    assert result.stdout == "still here\n", result
    assert result.error_kind is None
    assert box.stray_processes() == []


# --------------------------------------------------------------------------- functional


def test_isolation_is_complete_here(sandbox: PythonSandbox) -> None:
    # A failure, not a skip: CI must have every primitive (the memory cgroup included).
    assert PythonSandbox.check_isolation() == []
    assert sandbox.sandboxed
    assert sandbox.memory_cgroup


def test_stdout_and_stderr_are_captured(sandbox: PythonSandbox) -> None:
    result = sandbox.run("import sys\nprint(sum(range(1000)))\nprint('oops', file=sys.stderr)")
    assert result.stdout == "499500\n"
    assert result.stderr == "oops\n"
    assert result.exit_code == 0
    assert result.error_kind is None
    assert result.ok
    assert result.latency_ms > 0


def test_numpy_and_pil_work(sandbox: PythonSandbox) -> None:
    code = (
        "import numpy as np\nfrom PIL import Image, ImageDraw\n"
        "a = np.arange(12).reshape(3, 4)\nprint(int(a.sum()), a.shape)\n"
        "im = Image.new('RGB', (8, 8))\nImageDraw.Draw(im).rectangle((0, 0, 3, 3), fill='red')\n"
        "print(im.getpixel((1, 1)))\n"
    )
    result = sandbox.run(code)
    assert result.stdout == "66 (3, 4)\n(255, 0, 0)\n", result


def test_input_image_is_readable_and_saved_images_come_back(sandbox: PythonSandbox) -> None:
    code = (
        "from PIL import Image\n"
        "im = Image.open('image_0.png')\nprint(im.size, im.getpixel((0, 0)))\n"
        "im.crop((0, 0, 8, 8)).resize((16, 16)).save('out/zoom.png')\n"
        "im.convert('L').save('out/gray.jpg')\n"
        "open('out/notes.txt', 'w').write('not an image')\n"
    )
    result = sandbox.run(code, {"image_0.png": png()})
    assert result.stdout == "(32, 16) (255, 0, 0)\n", result
    assert len(result.images) == 2  # gray.jpg (converted to PNG), zoom.png: name order
    sizes = [PILImage.open(io.BytesIO(data)).size for data in result.images]
    assert sizes == [(32, 16), (16, 16)]
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") for data in result.images)


def test_images_beyond_the_limit_or_invalid_are_dropped_with_a_note(
    sandbox: PythonSandbox,
) -> None:
    code = (
        "from PIL import Image\n"
        "for i in range(3): Image.new('RGB', (4, 4)).save(f'out/{i}.png')\n"
        "open('out/fake.png', 'wb').write(b'not a png at all, honestly')\n"
    )
    result = sandbox.run(code, limits=SandboxLimits(max_images_out=2))
    assert len(result.images) == 2
    assert "max_images_out=2" in result.message
    result = sandbox.run(code, limits=SandboxLimits(max_images_out=8))
    assert len(result.images) == 3
    assert "not valid" in result.message


def test_an_exception_is_the_codes_error_not_the_sandboxs(sandbox: PythonSandbox) -> None:
    result = sandbox.run("def f():\n    return 1 / 0\n\nprint('before')\nf()\n")
    assert result.stdout == "before\n"
    assert result.exit_code == 1
    assert result.error_kind is None
    assert "Traceback (most recent call last)" in result.stderr
    assert 'File "<tool>", line 2, in f' in result.stderr
    assert "return 1 / 0" in result.stderr  # the source line is shown
    assert "ZeroDivisionError: division by zero" in result.stderr
    assert "zygote" not in result.stderr  # no sandbox frames
    assert "axpo_tools" not in result.stderr
    assert "ZeroDivisionError" in result.message


def test_syntax_error_and_exit_status(sandbox: PythonSandbox) -> None:
    result = sandbox.run("def (")
    assert result.exit_code == 1
    assert result.error_kind is None
    assert "SyntaxError" in result.stderr
    result = sandbox.run("import sys\nprint('bye')\nsys.exit(3)")
    assert (result.stdout, result.exit_code, result.error_kind) == ("bye\n", 3, None)


def test_output_is_truncated_with_a_marker(sandbox: PythonSandbox) -> None:
    result = sandbox.run("print('y' * 20000)", limits=SandboxLimits(output_bytes=1000))
    assert result.stdout.startswith("y" * 1000)
    assert result.stdout.endswith("\n[... output truncated: 19001 bytes omitted]")
    assert result.error_kind is None
    assert result.exit_code == 0


def test_per_call_limits_and_input_validation(sandbox: PythonSandbox) -> None:
    result = sandbox.run(
        "print(1)", {"big.bin": b"x" * (2 << 20)}, SandboxLimits(tmp_bytes=1 << 20)
    )
    assert result.error_kind is ToolErrorKind.RESOURCE_LIMIT
    with pytest.raises(ValueError, match="in use by another PythonSandbox"):
        PythonSandbox(LIMITS, workers=1, uid_base=sandbox.worker_uids[0])
    for bad in ("../x", "a/b", ".hidden", "out", ""):
        with pytest.raises(ValueError, match="bad sandbox file name"):
            sandbox.run("print(1)", {bad: b""})
    # A file larger than file_bytes may still be given as input (limits apply to the code).
    result = sandbox.run(
        "import os; print(os.path.getsize('in.bin'))",
        {"in.bin": b"z" * (3 << 20)},
        SandboxLimits(file_bytes=1 << 20),
    )
    assert result.stdout == f"{3 << 20}\n", result


def test_concurrent_runs_use_both_workers(sandbox: PythonSandbox) -> None:
    code = "import os, time\ntime.sleep(0.2)\nprint(os.getuid())"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: sandbox.run(code), range(4)))
    uids = {int(r.stdout) for r in results}
    assert all(r.ok for r in results)
    assert uids <= set(sandbox.worker_uids)
    assert 0 not in uids
    assert len(uids) >= 2
    assert_healthy(sandbox)


def test_a_dead_zygote_is_replaced(sandbox: PythonSandbox) -> None:
    zygote = sandbox._workers[0].proc
    assert zygote is not None
    os.kill(zygote.pid, signal.SIGKILL)
    zygote.wait()
    results = [sandbox.run("print(6 * 7)") for _ in range(3)]
    assert all(r.stdout == "42\n" for r in results), results
    assert_healthy(sandbox)


def test_warm_and_cold_latency(sandbox: PythonSandbox, capsys: pytest.CaptureFixture[str]) -> None:
    code = "print(sum(range(1000)))"
    for _ in range(3):
        sandbox.run(code)
    warm = []
    for _ in range(30):
        t0 = time.perf_counter()
        assert sandbox.run(code).stdout == "499500\n"
        warm.append((time.perf_counter() - t0) * 1000)
    with PythonSandbox(LIMITS, workers=1, warm=False, uid_base=61200) as cold_box:
        cold = []
        for _ in range(3):
            t0 = time.perf_counter()
            assert cold_box.run(code).stdout == "499500\n"
            cold.append((time.perf_counter() - t0) * 1000)
    with capsys.disabled():
        print(
            f"\n[sandbox latency] warm p50 {statistics.median(warm):.1f} ms"
            f" (min {min(warm):.1f}), cold p50 {statistics.median(cold):.1f} ms"
        )


def test_close_leaves_no_process_behind() -> None:
    box = PythonSandbox(LIMITS, workers=1, uid_base=61000)
    zygote = box._workers[0].proc
    assert zygote is not None
    assert box.run("import os\nif os.fork() == 0:\n    import time; time.sleep(60)").ok
    cgroups = box._cgroups
    box.close()
    assert zygote.poll() is not None
    assert uid_processes(box.worker_uids) == {}
    assert cgroups is not None
    assert not os.path.exists(cgroups.base)
    with pytest.raises(RuntimeError, match="closed"):
        box.run("print(1)")


def test_missing_isolation_refuses_or_runs_loudly_unsandboxed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(PythonSandbox, "_isolation", ["PID namespace (test)"])
    with pytest.raises(SandboxUnavailableError, match="PID namespace"):
        PythonSandbox(LIMITS, workers=1)
    with (
        caplog.at_level(logging.WARNING),
        PythonSandbox(LIMITS, workers=1, allow_unsandboxed=True, uid_base=61100) as box,
    ):
        result = box.run("import os\nprint(os.getuid(), sorted(os.listdir('.')))", {"a.txt": b"1"})
        assert result.stdout == "61100 ['a.txt', 'out', 'tmp']\n", result
        assert box.run("while True: pass", limits=SandboxLimits(wall_s=0.5)).error_kind is (
            ToolErrorKind.TIMEOUT
        )
    assert any("UNSANDBOXED" in r.getMessage() for r in caplog.records)


def test_files_of_one_request_are_invisible_to_the_next(sandbox: PythonSandbox) -> None:
    first = sandbox.run(
        f"open('left.txt', 'w').write('{SECRET}')\nimport os, tempfile\n"
        "open(os.path.join(tempfile.gettempdir(), 'left2.txt'), 'w').write('x')\n"
        "print(os.listdir('.'))"
    )
    assert "left.txt" in first.stdout
    for _ in range(4):  # lands on every worker and uid
        second = sandbox.run(
            "import os, tempfile\n"
            "print(sorted(os.listdir('.')), os.listdir(tempfile.gettempdir()), os.listdir('out'))"
        )
        assert second.stdout == "['out', 'tmp'] [] []\n", second
    assert_healthy(sandbox)


def test_network_state_of_one_request_is_invisible_to_the_next(sandbox: PythonSandbox) -> None:
    # Each request has a network namespace of its own (a shared one would carry sockets
    # kept alive past their process, or counters in /proc/net/snmp, from one to the next).
    first = sandbox.run(
        "import os, socket, time\n"
        "u = socket.socket(socket.AF_UNIX); u.bind(b'\\0axpo-left-behind'); u.listen()\n"
        "t = socket.socket(); t.bind(('0.0.0.0', 4711)); t.listen()\n"
        "d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(7):\n"
        "    try:\n        d.sendto(b'x', ('127.0.0.1', 9))\n"
        "    except OSError:\n        pass\n"
        "if os.fork() == 0:  # keeps them open after the run's main process has ended\n"
        "    time.sleep(30)\n"
        "print('left')\n"
    )
    assert first.stdout == "left\n", first
    check = (
        "import socket\n"
        "lines = open('/proc/net/snmp').read().splitlines()\n"
        "ip = dict(zip(lines[0].split()[1:], lines[1].split()[1:]))\n"
        "unix = [line.split()[-1] for line in open('/proc/net/unix').read().splitlines()[1:]]\n"
        "tcp = open('/proc/net/tcp').read().splitlines()[1:]\n"
        "u = socket.socket(socket.AF_UNIX); u.bind(b'\\0axpo-left-behind')\n"
        "t = socket.socket(); t.bind(('0.0.0.0', 4711))\n"
        "print(ip['OutNoRoutes'], unix, tcp)\n"
    )
    for _ in range(4):  # lands on every worker and uid
        second = sandbox.run(check)
        assert second.stdout == "0 [] []\n", second
    assert_healthy(sandbox)


def test_a_runs_processes_are_reaped_before_the_next_run() -> None:
    # One worker: the second run goes to the same zygote as the first. The first run is
    # answered as soon as its code is done and its process tree killed; it must be reaped
    # before the second run's code starts, and wait_reaped() must say when it is.
    with PythonSandbox(LIMITS, workers=1, uid_base=61300) as box:
        zygote = box._workers[0].proc
        assert zygote is not None

        def leftovers(uid: int) -> list[int]:
            # Processes of the uid but the zygote's own children (prepared for requests).
            found = uid_processes([uid])
            return sorted(pid for pid, ppid in found.items() if ppid != zygote.pid)

        daemon = (
            "import os, time\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\n"
            "print(os.getuid())\n"
        )
        first = box.run(daemon)
        assert first.ok, first
        uid = int(first.stdout)
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(box.run, "import time, os\ntime.sleep(0.5)\nprint(os.getuid())")
            time.sleep(0.25)  # the second run is sleeping now
            assert leftovers(uid) == []
            assert second.result().ok
        assert int(second.result().stdout) != uid  # the slot's two uids in turn
        third = box.run(daemon)
        assert third.ok, third
        assert box.wait_reaped()
        assert leftovers(int(third.stdout)) == []
        assert box.stray_processes() == []


def test_each_run_has_its_own_random_sequence(sandbox: PythonSandbox) -> None:
    code = "import random, os\nprint(random.getrandbits(64), os.urandom(8).hex())"
    outputs = [sandbox.run(code).stdout for _ in range(6)]
    assert all(out.count(" ") == 1 for out in outputs), outputs
    assert len(set(outputs)) == len(outputs), outputs


def test_only_the_interpreter_of_a_venv_is_visible_in_its_bin(sandbox: PythonSandbox) -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtual environment")
    host_bin = Path(sys.prefix) / "bin"
    scripts = {p.name for p in host_bin.iterdir() if not p.is_symlink() and p.is_file()}
    scripts -= {"python", "python3", f"python3.{sys.version_info.minor}"}
    assert scripts, "the venv has entry-point scripts (pytest at least)"
    result = sandbox.run(f"import os\nprint(sorted(os.listdir({str(host_bin)!r})))")
    visible = set(ast.literal_eval(result.stdout))
    assert not visible & scripts, visible & scripts
    assert visible <= {p.name for p in host_bin.iterdir()}


# --------------------------------------------------------------------------- attacks


@dataclass(frozen=True)
class Attack:
    """Model-written code that tries something; ``check`` judges the result and the host."""

    name: str
    code: str
    check: Callable[[RunResult, Host], None]
    limits: SandboxLimits | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    max_s: float = 5.0


def _no_secret(result: RunResult, _host: Host) -> None:
    assert SECRET not in result.stdout + result.stderr, result
    assert result.error_kind is None, result


def _printed(*needles: str) -> Callable[[RunResult, Host], None]:
    """The code ran, printed each needle ($name: a host value) and no ``LEAK``."""

    def check(result: RunResult, host: Host) -> None:
        _no_secret(result, host)
        for needle in needles:
            needle = Template(needle).substitute(host.values())
            assert needle in result.stdout, (needle, result)
        assert "LEAK" not in result.stdout, result

    return check


# What the sandbox's root may hold: its own folders, the host's system folders (read-only)
# and the top folder of wherever this Python lives (a CI checkout under /check, a venv).
_SANDBOX_TOPS = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root"}
_SANDBOX_TOPS |= {"sandbox", "sbin", "tmp", "usr", "var"}


def _python_tops() -> set[str]:
    import site

    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()]
    paths += list(sysconfig.get_paths().values())
    return {Path(p).resolve().parts[1] for p in paths if len(Path(p).resolve().parts) > 1}


def _root_is_sandbox_root(result: RunResult, host: Host) -> None:
    _printed("chroot blocked", "root now ['bin', ")(result, host)
    line = next(x for x in result.stdout.splitlines() if x.startswith("root now "))
    listed = set(ast.literal_eval(line.removeprefix("root now ")))
    assert {"bin", "dev", "etc", "sandbox", "proc"} <= listed, line
    unexpected = listed - _SANDBOX_TOPS - _python_tops()
    assert not unexpected, (f"host folders visible at the sandbox root: {unexpected}", line)


def _no_connection(*needles: str) -> Callable[[RunResult, Host], None]:
    def check(result: RunResult, host: Host) -> None:
        _printed(*needles)(result, host)
        assert host.listener.connections == 0
        assert host.listener.datagrams() == 0

    return check


def _kind(kind: ToolErrorKind, *needles: str) -> Callable[[RunResult, Host], None]:
    def check(result: RunResult, _host: Host) -> None:
        assert result.error_kind is kind, result
        for needle in needles:
            assert needle in result.message + result.stderr, (needle, result)

    return check


def _marker_absent(*needles: str) -> Callable[[RunResult, Host], None]:
    def check(result: RunResult, host: Host) -> None:
        _printed(*needles)(result, host)
        assert not os.path.exists(host.marker)

    return check


def _victim_untouched(*needles: str) -> Callable[[RunResult, Host], None]:
    def check(result: RunResult, host: Host) -> None:
        _printed(*needles)(result, host)
        assert host.victim.poll() is None, "the host process was killed"
        with open(f"/proc/{host.victim.pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()

    return check


def _files_unchanged(*needles: str) -> Callable[[RunResult, Host], None]:
    def check(result: RunResult, host: Host) -> None:
        _printed(*needles)(result, host)
        assert file_digest("/etc/passwd") == host.passwd_digest
        assert file_digest(os.path.join(SITE_PACKAGES, "numpy", "__init__.py")) == (
            host.numpy_digest
        )
        assert not os.path.exists(os.path.join(SITE_PACKAGES, "evil.py"))
        assert not os.path.exists("/etc/evil")

    return check


def _crashed(needle: str) -> Callable[[RunResult, Host], None]:
    """The code failed on its own: a traceback and status 1, not a sandbox error."""

    def check(result: RunResult, host: Host) -> None:
        _no_secret(result, host)
        assert result.exit_code == 1, result
        assert needle in result.stderr, result

    return check


def _flooded(result: RunResult, _host: Host) -> None:
    assert result.error_kind is ToolErrorKind.RESOURCE_LIMIT, result
    assert "output limit" in result.message
    assert "[... output truncated: " in result.stdout
    assert len(result.stdout) < LIMITS.output_bytes + 200


def _tree_memory_capped(result: RunResult, _host: Host) -> None:
    # 6 x 300 MiB fits each process's RLIMIT_AS but not the tree's memory cgroup
    # (memory_bytes + tmp_bytes = 816 MiB): the kernel kills inside the group only.
    killed = result.stdout.count(" 9")
    assert killed >= 1 or result.error_kind is ToolErrorKind.RESOURCE_LIMIT, result
    assert "memory" in result.message, result


def _daemon_dead(result: RunResult, host: Host) -> None:
    _printed("parent done")(result, host)
    # The run has returned: its PID namespace, daemon included, must already be gone.
    assert host.listener.connections == 0
    time.sleep(1.2)  # past the daemon's wake-up
    assert host.listener.connections == 0
    assert not os.path.exists(host.marker)


TRY = "def attempt(label, fn):\n    try:\n        print(label, 'LEAK', repr(fn())[:200])\n    except BaseException as exc:\n        print(label, 'blocked', type(exc).__name__, exc)\n"  # noqa: E501

ATTACKS = [
    Attack(
        "tcp to a host service on loopback",
        TRY + "import socket\n"
        "attempt('tcp', lambda: socket.create_connection(('127.0.0.1', $port), timeout=2))\n"
        "attempt('tcp6', lambda: socket.create_connection(('::1', $port), timeout=2))\n",
        _no_connection("tcp blocked", "tcp6 blocked"),
    ),
    Attack(
        "udp to a host service on loopback",
        TRY + "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "attempt('udp', lambda: s.sendto(b'hello', ('127.0.0.1', $port)))\n",
        _no_connection("udp blocked"),
    ),
    Attack(
        "tcp to an external address",
        TRY + "import socket\n"
        "attempt('ext', lambda: socket.create_connection(('1.1.1.1', 443), timeout=2))\n"
        "attempt('ext6', lambda: socket.create_connection(('2606:4700::1111', 443), timeout=2))\n",
        _no_connection("ext blocked", "ext6 blocked"),
    ),
    Attack(
        "dns lookup",
        TRY + "import socket\n"
        "attempt('dns', lambda: socket.getaddrinfo('example.com', 80))\n"
        "attempt('localhost-svc', lambda: socket.create_connection(('localhost', $port), 2))\n",
        _no_connection("dns blocked", "localhost-svc blocked"),
    ),
    Attack(
        "bring the loopback up and use it",
        TRY + "import socket, fcntl, struct\n"
        "s = socket.socket()\n"
        "req = struct.pack('16sH14x', b'lo', 1)\n"
        "attempt('ifup', lambda: fcntl.ioctl(s, 0x8914, req))\n"
        "print('interfaces', socket.if_nameindex())\n"
        "attempt('raw', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))\n",
        _no_connection("ifup blocked", "interfaces [(1, 'lo')]", "raw blocked"),
    ),
    Attack(
        "read /etc/shadow and host secrets",
        TRY + "for p in ['/etc/shadow', '/etc/gshadow', '/etc/ssh/ssh_host_rsa_key',\n"
        "          '/root/.npmrc', '/root/.gitconfig', '/root/.bashrc', '$secret_file']:\n"
        "    attempt(p, lambda: open(p).read())\n",
        _printed("/etc/shadow blocked", "$secret_file blocked"),
    ),
    Attack(
        "list /root and /home",
        "import os\nprint('root', os.listdir('/root'))\n"
        "print('home', os.path.exists('/home'), 'pyenv', os.listdir('/root/.pyenv'))\n",
        _printed("root ['.pyenv']", "home False", "pyenv ['versions']"),
    ),
    Attack(
        "read the repository",
        # Wherever the checkout lives, only the venv's Python pieces may show through.
        TRY + "import os\n"
        "print('visible', sorted(set(os.listdir('$repo')) - {'.venv'}) if "
        "os.path.isdir('$repo') else [])\n"
        "attempt('repo', lambda: open('$repo/pyproject.toml').read())\n"
        "attempt('src', lambda: open('$repo/axpo/domain.py').read())\n",
        _printed("visible []", "repo blocked", "src blocked"),
    ),
    Attack(
        "the host's /proc/1/environ and process list",
        "import os\npids = sorted(p for p in os.listdir('/proc') if p.isdigit())\n"
        "print('pids', pids)\nprint('environ1', open('/proc/1/environ').read())\n"
        "print('server visible', os.path.exists('/proc/$server'))\n",
        _printed("pids ['1']", "environ1 PATH=", "server visible False"),
    ),
    Attack(
        "environment of the server",
        "import os\nprint('env', sorted(os.environ))\n"
        "print('self', open('/proc/self/environ').read().replace(chr(0), ' '))\n"
        "print('AXPO_SECRET' in os.environ)\n",
        _printed("env ['HOME',", "False"),
    ),
    Attack(
        "write to the host's /tmp",
        # /tmp is the sandbox's own (part of its tmpfs) and the write works inside only; when
        # the Python install itself lives under /tmp, /tmp is a read-only view and it fails.
        "import os\ntry:\n    open('$marker', 'w').write('escaped')\n"
        "    print('inside only', os.path.exists('$marker'))\n"
        "except OSError as exc:\n    print('refused', exc.errno)\n",
        _marker_absent(),
    ),
    Attack(
        "write to site-packages and /etc",
        TRY + "attempt('evil', lambda: open('$site/evil.py', 'w').write('x'))\n"
        "attempt('numpy', lambda: open('$site/numpy/__init__.py', 'a').write('x'))\n"
        "attempt('passwd', lambda: open('/etc/passwd', 'a').write('x'))\n"
        "attempt('etc', lambda: open('/etc/evil', 'w').write('x'))\n"
        "attempt('usr', lambda: open('/usr/lib/evil', 'w').write('x'))\n"
        "import os\nattempt('chmod', lambda: os.chmod('$site', 0o777))\n",
        _files_unchanged("evil blocked", "numpy blocked", "passwd blocked", "chmod blocked"),
    ),
    Attack(
        "fill the disk past tmp_bytes",
        "for i in range(10):\n    open(f'fill{i}', 'wb').write(b'x' * (15 << 20))\n",
        _kind(ToolErrorKind.RESOURCE_LIMIT, "No space left"),
        limits=SandboxLimits(tmp_bytes=40 << 20, file_bytes=16 << 20),
    ),
    Attack(
        "write a file past file_bytes",
        "open('big', 'wb').write(b'x' * (8 << 20))\n",
        _kind(ToolErrorKind.RESOURCE_LIMIT, "File too large"),
        limits=SandboxLimits(file_bytes=4 << 20),
    ),
    Attack(
        "fork bomb",
        "import os\nwhile True:\n    os.fork()\n",
        _kind(ToolErrorKind.RESOURCE_LIMIT, "process limit"),
    ),
    Attack(
        "fork bomb that survives its errors",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        _kind(ToolErrorKind.TIMEOUT),
        limits=SandboxLimits(wall_s=1.0),
    ),
    Attack(
        "thread bomb",
        "import threading, time\n"
        "while True:\n    threading.Thread(target=time.sleep, args=(60,)).start()\n",
        _crashed("can't start new thread"),
    ),
    Attack(
        "allocate 10 GB at once",
        "x = bytearray(10**10)\n",
        _kind(ToolErrorKind.RESOURCE_LIMIT, "memory limit", "MemoryError"),
    ),
    Attack(
        "grow memory gradually",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n",
        _kind(ToolErrorKind.RESOURCE_LIMIT, "memory limit"),
        limits=SandboxLimits(memory_bytes=384 << 20),
    ),
    Attack(
        "memory spread over many processes",
        "import os, time\npids = []\n"
        "for _ in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
        "        block = b'x' * (300 << 20)  # touched, not just reserved\n"
        "        time.sleep(0.3)\n        os._exit(0)\n    pids.append(pid)\n"
        "print('children', [os.waitpid(p, 0)[1] for p in pids])\n",
        _tree_memory_capped,
        # Touching 1.8 GB took over 5 s on a heavily shared 2-core VM (3 of ~20 runs): the
        # cgroup cap is what is under test, so give the run the time to reach it.
        limits=replace(LIMITS, wall_s=12.0, cpu_s=12.0),
        max_s=15.0,
    ),
    Attack(
        "a huge numpy array",
        "import numpy as np\nnp.ones((100000, 100000))\n",
        _kind(ToolErrorKind.RESOURCE_LIMIT, "memory limit"),
    ),
    Attack(
        "spin the CPU forever (wall clock)",
        "while True:\n    pass\n",
        _kind(ToolErrorKind.TIMEOUT, "wall-clock limit of 1s"),
        limits=SandboxLimits(wall_s=1.0),
        max_s=1.0 + TIMEOUT_SLACK_S,
    ),
    Attack(
        "spin the CPU forever (CPU limit)",
        "while True:\n    pass\n",
        _kind(ToolErrorKind.TIMEOUT, "CPU time limit"),
        limits=SandboxLimits(wall_s=10.0, cpu_s=1.0),
        max_s=1.0 + TIMEOUT_SLACK_S,
    ),
    Attack(
        "sleep forever",
        "import time\nprint('sleeping', flush=True)\ntime.sleep(10**6)\n",
        _kind(ToolErrorKind.TIMEOUT, "wall-clock"),
        limits=SandboxLimits(wall_s=1.0),
        max_s=1.0 + TIMEOUT_SLACK_S,
    ),
    Attack(
        "unbounded stdout",
        "while True:\n    print('x' * 1000)\n",
        _flooded,
    ),
    Attack(
        "double-forked daemon that outlives the call",
        "import os, socket, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        time.sleep(0.8)\n"
        "        try:\n            socket.create_connection(('127.0.0.1', $port), 1)\n"
        "        except OSError:\n            pass\n"
        "        open('$marker', 'w').write('daemon')\n"
        "    os._exit(0)\n"
        "print('parent done')\n",
        _daemon_dead,
    ),
    Attack(
        "kill the parent, everyone, and pid 1",
        "import os, signal\n"
        "for target in (os.getppid(), -1, 1, $server, $victim):\n"
        "    try:\n        os.kill(target, signal.SIGKILL)\n"
        "    except OSError as exc:\n        print('kill', target, exc.errno)\n"
        "print('still running')\n",
        _victim_untouched("still running", "kill $server 3", "kill $victim 3"),
    ),
    Attack(
        "signal host processes by guessing pids",
        "import os, signal\nhits = []\n"
        "for pid in list(range(2, 5000)) + [$server, $victim]:\n"
        "    try:\n        os.kill(pid, signal.SIGTERM)\n        hits.append(pid)\n"
        "    except OSError:\n        pass\n"
        "print('hits', hits)\n",
        _victim_untouched("hits []"),
    ),
    Attack(
        "ptrace pid 1 and a host process",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for pid in (1, $victim, $server):\n"
        "    rc = libc.ptrace(16, pid, 0, 0)\n"
        "    print('ptrace', pid, rc, ctypes.get_errno())\n"
        "print('done')\n",
        _victim_untouched("ptrace 1 -1 1", "ptrace $victim -1", "done"),
    ),
    Attack(
        "become root",
        TRY + "import os, subprocess\n"
        "attempt('setuid', lambda: os.setuid(0))\n"
        "attempt('setresuid', lambda: os.setresuid(0, 0, 0))\n"
        "for cmd in (['su', '-c', 'id -u'], ['mount', '-t', 'tmpfs', 'x', '/mnt'],\n"
        "            ['sudo', 'id', '-u']):\n"
        "    try:\n        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3)\n"
        "        print(cmd[0], 'rc', p.returncode, p.stdout.strip() == '0')\n"
        "    except (OSError, subprocess.TimeoutExpired) as exc:\n"
        "        print(cmd[0], 'failed', type(exc).__name__)\n"
        "print('uid', os.getuid(), os.geteuid(), os.getgroups())\n",
        _printed("setuid blocked", "setresuid blocked", "uid 6"),
    ),
    Attack(
        "mount a filesystem",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('mount', libc.mount(b'none', b'/sandbox/tmp', b'tmpfs', 0, None),"
        " ctypes.get_errno())\n"
        "print('umount', libc.umount2(b'/proc', 2), ctypes.get_errno())\n",
        _printed("mount -1 1", "umount -1 1"),
    ),
    Attack(
        "chroot escape",
        TRY + "import os\nos.makedirs('jail/deeper', exist_ok=True)\n"
        "attempt('chroot', lambda: os.chroot('jail'))\n"
        "for _ in range(20):\n    os.chdir('..')\n"
        "attempt('pivot', lambda: os.chroot('.'))\n"
        "print('root now', sorted(os.listdir('/')))\n",
        _root_is_sandbox_root,
    ),
    Attack(
        "unshare namespaces through ctypes",
        "import ctypes, subprocess\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for flags in (0x10000000, 0x10020000, 0x40000000, 0x20000000):\n"
        "    print('unshare', hex(flags), libc.unshare(flags), ctypes.get_errno())\n"
        "print('setns', libc.setns(0, 0), ctypes.get_errno())\n"
        "p = subprocess.run(['unshare', '-Ur', 'id', '-u'], capture_output=True, text=True)\n"
        "print('unshare-cmd', p.returncode, p.stdout.strip())\n",
        _printed("unshare 0x10000000 -1 1", "unshare 0x40000000 -1 1", "unshare-cmd 1"),
    ),
    Attack(
        "kernel interfaces: keyctl, bpf, perf, io_uring, modules",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for name, nr in (('keyctl', 250), ('bpf', 321), ('perf', 298), ('io_uring', 425),\n"
        "                 ('init_module', 175), ('kexec', 246), ('userfaultfd', 323)):\n"
        "    print(name, libc.syscall(nr, 0, 0, 0, 0, 0), ctypes.get_errno())\n",
        _printed("keyctl -1 1", "bpf -1 1", "perf -1 1", "io_uring -1 1", "kexec -1 1"),
    ),
    Attack(
        "a foreign syscall ABI (int 0x80)",
        "import ctypes, mmap\n"
        "code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret\n"
        "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "m.write(code)\n"
        "fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))\n"
        "print('pid via int80', fn())\n",
        _kind(ToolErrorKind.SANDBOX_VIOLATION),
    ),
    Attack(
        "/dev access",
        TRY + "import os\nprint('dev', sorted(os.listdir('/dev')))\n"
        "for p in ('/dev/mem', '/dev/kmem', '/dev/kmsg', '/dev/vda', '/dev/sda', '/dev/port'):\n"
        "    attempt(p, lambda: open(p, 'rb').read(1))\n"
        "attempt('mknod', lambda: os.mknod('mem', 0o600 | 0o020000, os.makedev(1, 1)))\n",
        _printed(
            "dev ['fd', 'full', 'null', 'random', 'shm', 'stderr', 'stdin', 'stdout', 'urandom',",
            "/dev/mem blocked",
            "mknod blocked",
        ),
    ),
    Attack(
        "symlinks to host paths",
        TRY + "import os\n"
        "for i, target in enumerate(['/work/main/pyproject.toml', '$secret_file',\n"
        "                            '/root/.npmrc', '/proc/$server/environ']):\n"
        "    os.symlink(target, f'link{i}')\n"
        "    attempt(target, lambda: open(f'link{i}').read())\n"
        "os.symlink('/etc/passwd', 'out/x.png')\n",
        _printed("/work/main/pyproject.toml blocked", "$secret_file blocked"),
    ),
    Attack(
        "escape through a shell",
        "import subprocess\n"
        "p = subprocess.run(['sh', '-c', 'cat /etc/shadow; echo pwned > $marker; "
        "echo uid=$$(id -u); ls /root /work/main; cat $secret_file; echo done'],\n"
        "                   capture_output=True, text=True)\n"
        "print(p.stdout)\nprint(p.stderr)\n",
        _marker_absent("done", "uid=6"),
    ),
    Attack(
        "a child interpreter",
        "import subprocess, sys\n"
        "p = subprocess.run([sys.executable, '-c', 'import os, numpy; "
        "print(os.getuid() != 0, sorted(os.environ))'], capture_output=True, text=True)\n"
        "print(p.stdout, p.stderr)\n",
        _printed("True ['HOME',"),
    ),
    Attack(
        "open too many files",
        "files = []\nwhile True:\n    files.append(open('/dev/null'))\n",
        _kind(ToolErrorKind.RESOURCE_LIMIT, "open-file limit"),
    ),
    Attack(
        "unbounded recursion",
        "def f(n):\n    return f(n + 1)\n\nf(0)\n",
        _crashed("RecursionError: maximum recursion depth exceeded"),
    ),
    Attack(
        "huge argv",
        TRY + "import subprocess\nattempt('argv', lambda: subprocess.run(['true', 'x' * 10**7]))\n",
        _printed("argv blocked OSError"),
    ),
    Attack(
        "capabilities and privileges",
        "fields = ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp:')\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith(fields):\n        print(line.split()[0], line.split()[1])\n"
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('dumpable', libc.prctl(4, 0, 0, 0, 0), ctypes.get_errno())\n",
        _printed(
            "CapEff: 0000000000000000",
            "CapBnd: 0000000000000000",
            "NoNewPrivs: 1",
            "Seccomp: 2",
            "dumpable -1 1",
        ),
    ),
    Attack(
        "kernel knobs through /proc and /sys",
        TRY + "attempt('sysrq', lambda: open('/proc/sysrq-trigger', 'w').write('b'))\n"
        "attempt('hostname', lambda: open('/proc/sys/kernel/hostname', 'w').write('x'))\n"
        "attempt('sys', lambda: open('/sys/kernel/uevent_helper', 'w').write('x'))\n"
        "attempt('kcore', lambda: open('/proc/kcore', 'rb').read(16))\n"
        "import socket\nprint('hostname', socket.gethostname())\n",
        _printed("sysrq blocked", "hostname blocked", "sys blocked", "kcore blocked", "sandbox"),
    ),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack(sandbox: PythonSandbox, host: Host, attack: Attack) -> None:
    values = host.values()
    code = Template(attack.code).substitute(values)
    t0 = time.monotonic()
    result = sandbox.run(code, attack.files, attack.limits)
    elapsed = time.monotonic() - t0
    assert sandbox.stray_processes() == [], "a sandbox process outlived its run"
    attack.check(result, host)
    assert elapsed < attack.max_s, f"{attack.name} took {elapsed:.1f}s"
    assert host.victim.poll() is None
    assert not os.path.exists(host.marker)
    assert_healthy(sandbox)


def test_host_process_count_recovers_after_a_fork_bomb(sandbox: PythonSandbox) -> None:
    def count() -> int:
        return sum(1 for p in os.listdir("/proc") if p.isdigit())

    before = count()
    result = sandbox.run(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        limits=SandboxLimits(wall_s=1.0),
    )
    assert result.error_kind is ToolErrorKind.TIMEOUT
    # At most the two zygotes' waiting children differ; the bomb's 16 processes are gone.
    assert count() <= before + 2
    assert len(uid_processes(sandbox.worker_uids)) <= len(sandbox.worker_uids) // 2
    assert_healthy(sandbox)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
