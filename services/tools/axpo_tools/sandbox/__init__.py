"""Run model-written Python safely and fast.

>>> with PythonSandbox(SandboxLimits(wall_s=5)) as sandbox:  # doctest: +SKIP
...     sandbox.run("print(sum(range(1000)))").stdout
'499500\\n'

Every request runs in a process forked from a warm zygote (numpy and PIL already imported)
into fresh mount, network, PID, IPC, UTS and cgroup namespaces, as an unprivileged uid with
no capabilities, no_new_privs, a seccomp filter and rlimits, on a read-only root that holds
only the system and Python directories, with a private size-capped tmpfs ``/sandbox`` as
its working directory (input files there, images written to ``/sandbox/out`` come back).
See :mod:`axpo_tools.sandbox.zygote` for the steps and :class:`SandboxLimits` for limits.
"""

from axpo_tools.sandbox.api import RunResult, SandboxLimits, SandboxUnavailableError
from axpo_tools.sandbox.pool import PythonSandbox

__all__ = ["PythonSandbox", "RunResult", "SandboxLimits", "SandboxUnavailableError"]
