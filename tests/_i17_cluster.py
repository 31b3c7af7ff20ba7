"""A loopback Ray cluster whose nodes are added and killed one by one (issue 17's tests: a
spot worker preempted mid-training and replaced, a cluster with no GPU, fake GPUs without the
COUN_TUNE_ALLOW_FAKE_GPU opt-out).

Each node is a `ray start` of its own (own --temp-dir, bounded memory, token auth, its own
environment), started in its own session: `kill_node` SIGKILLs that session (the raylet, its
workers and agents: what a preempted machine loses), `close` stops everything by PID. Never
`ray stop`. Built on tests/_search_helpers.py's process helpers, like test_search_cluster.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _search_helpers import cmdline, free_ports, pids_with_arg, session_pids, stop_until_gone

NODE_MEMORY = 2 * 1024**3  # each `ray start` would otherwise claim the machine's memory
NODE_OBJECT_STORE = 100 * 1024**2


def ray_exe() -> str:
    exe = Path(sys.executable).with_name("ray")
    assert exe.is_file(), f"no `ray` next to {sys.executable}"
    return str(exe)


class LoopbackCluster:
    """`with LoopbackCluster(base) as c:` then c.add("head", cpus=1, gpus=0, env=...) first,
    c.add("w1", ...) for workers; c.address; c.kill_node("w1")."""

    def __init__(self, base: Path):
        self.base = base
        self.sessions: dict[str, int] = {}
        self.temp_dirs: dict[str, Path] = {}
        self.address: str | None = None

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, name: str, *, cpus: float, gpus: float, env: dict, timeout: float = 420, tries: int = 3) -> Path:
        """Start node `name`. On a loaded machine a raylet can die at start (it waits a fixed
        time for its agent's port file): what that start left is stopped and it is tried again."""
        for attempt in range(tries):
            try:
                return self._start(name, cpus=cpus, gpus=gpus, env=env, timeout=timeout)
            except AssertionError:
                if attempt == tries - 1:
                    raise
                stop_until_gone(lambda: self.node_pids(name), grace=5)  # (self.address is set on success only)
        raise AssertionError("unreachable")

    def _start(self, name: str, *, cpus: float, gpus: float, env: dict, timeout: float) -> Path:
        temp_dir = self.base / name  # short: Ray's Unix sockets live under it (108-byte limit)
        agent, metrics, gcs = free_ports(3)
        args = [
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(cpus),
            "--num-gpus",
            str(gpus),
            "--memory",
            str(NODE_MEMORY),
            "--object-store-memory",
            str(NODE_OBJECT_STORE),
            "--disable-usage-stats",
            "--dashboard-agent-listen-port",
            str(agent),
            "--metrics-export-port",
            str(metrics),
            "--temp-dir",
            str(temp_dir),
        ]
        if self.address is None:
            # not Ray Client's default port 10001: other tests' clusters may run at the same time
            (client,) = free_ports(1)
            args = [
                "--head",
                "--port",
                str(gcs),
                "--ray-client-server-port",
                str(client),
                "--include-dashboard=false",
                *args,
            ]
        else:
            args = ["--address", self.address, *args]
        # on a loaded machine a node's registration can take longer than Ray's 30 s default
        env = {"RAY_raylet_start_wait_time_s": "300", "RAY_agent_register_timeout_ms": "300000", **env}
        proc = subprocess.Popen(
            [ray_exe(), "start", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.sessions[name] = proc.pid  # its daemons keep this session id after `ray start` exits
        self.temp_dirs[name] = temp_dir
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(f"`ray start` of {name} ran over {timeout} s:\n{out[-3000:]}") from None
        assert proc.returncode == 0, (
            f"`ray start` of {name} exited {proc.returncode}:\n{out[-1500:]}\n{self.logs(name)}"
        )
        assert self.raylet_running(name), f"no raylet running for node {name}"
        if self.address is None:
            self.address = f"127.0.0.1:{gcs}"
        return temp_dir

    def logs(self, name: str, n: int = 15) -> str:
        """The last lines of the node's raylet and GCS logs (what a failed start left)."""
        out = []
        for f in sorted(self.temp_dirs[name].glob("session_*/logs/*")):
            if f.name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err") and f.stat().st_size:
                out.append(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    def raylet_running(self, name: str) -> bool:
        return any(cmdline(p).split(" ")[0].endswith("/raylet") for p in self.node_pids(name))

    def node_pids(self, name: str) -> list[int]:
        return sorted(set(session_pids(self.sessions[name])) | set(pids_with_arg(str(self.temp_dirs[name]))))

    def kill_node(self, name: str) -> int:
        """SIGKILL every process of node `name` at once (a preempted machine); returns how many."""
        pids = self.node_pids(name)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while self.node_pids(name) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not self.node_pids(name), f"node {name} survived SIGKILL: {self.node_pids(name)}"
        return len(pids)

    def all_pids(self) -> list[int]:
        pids = set(pids_with_arg(str(self.base)))
        for sid in self.sessions.values():
            pids |= set(session_pids(sid))
        return sorted(pids)

    def close(self) -> None:
        # gcs_server and the autoscaler monitor may sit out a SIGTERM: a short grace, then SIGKILL
        left = stop_until_gone(self.all_pids, grace=8)
        assert not left, f"Ray processes of this test still running: {left}"
