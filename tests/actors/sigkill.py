"""SIGKILL an actor's process at a chosen moment, as an OOM killer or a lost node would: found by the process title
Ray gives a worker while it runs a call (`ray::[<actor name>:]<Class>.__init__` while the constructor runs,
`ray::<Class>.<method>` during a method: only the constructor's title names the actor)."""

from __future__ import annotations

import os
import signal
import threading
import time


def _pids(call: str, actor: str) -> list[int]:
    """Processes running `call` (`Class.method`) now, in an actor whose name starts with `actor` if given (a
    process that ran another actor's constructor can keep that title for a moment after it failed)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        title = (p.info["cmdline"] or [""])[0]
        if not title.startswith(f"ray::{actor}"):
            continue
        if title[5:] == call or title.endswith(f":{call}"):
            found.append(p.pid)
    return found


class KillWhen:
    """A thread that SIGKILLs the first process it sees running `call` (`Class.method`) in an actor named
    `actor...`, once, within `timeout` s."""

    def __init__(self, call: str, actor: str = "", timeout: float = 120):
        self.call, self.actor, self.timeout, self.killed = call, actor, timeout, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for pid in _pids(self.call, self.actor):
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                return
            time.sleep(0.02)

    def join(self) -> list[int]:
        self.thread.join(self.timeout + 5)
        return self.killed
