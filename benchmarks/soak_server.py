"""The soak run's server side: a supervisor that keeps one `steerserve serve` up on a fixed port, the engine kill,
and the server's resource samples (RSS and its anonymous part, open file descriptors) read from /proc.

The supervisor is the small restart loop a deployment would have (systemd, Kubernetes): it restarts the server
when the process exits, and also when `/ready` has stayed non-200 for more than `unready_grace` seconds after the
server was ready once (a server whose engine died but which keeps running); then it SIGKILLs the process group and
starts a new one on the same port. Every start, exit, kill and restart is an event with a monotonic timestamp.

The engine is vLLM's EngineCore: a child process of the server (the server runs vLLM with multiprocessing on,
whatever the caller's environment says), found by its process title or command line.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def children(pid: int) -> list[int]:
    """The live direct children of `pid` (zombies left out), from /proc/*/stat."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state, ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            found.append(int(entry))
    return found


def describe_process(pid: int) -> str:
    """comm and command line of `pid` ('' once it is gone)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
    return f"{comm} {cmdline}"


def engine_core_pid(server_pid: int) -> int | None:
    """The EngineCore child of the server: vLLM titles it `VLLM::EngineCore` (comm is cut at 15 characters)."""
    for pid in children(server_pid):
        if "EngineCor" in describe_process(pid):
            return pid
    return None


def memory_mib(pid: int) -> tuple[float | None, float | None]:
    """Resident set size of `pid` and its anonymous part (heap, not file-backed pages such as mapped weights and
    libraries, which the kernel drops under memory pressure), in MiB; None once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None, None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


@dataclass
class Supervisor:
    """Starts `command` (a `steerserve serve` without --port) on `port` and keeps it serving; `run()` is the
    watch loop (an asyncio task), `kill_engine()` the fault. Times are `time.monotonic()` minus `t0`."""

    command: list[str]
    port: int
    env: dict[str, str]
    log_dir: Path
    unready_grace: float = 10.0
    startup_timeout: float = 600.0
    t0: float = field(default_factory=time.monotonic)
    events: list[dict] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    incarnation: int = 0
    ready: bool = False
    _stopping: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, what: str, **details) -> dict:
        ev = {"t": round(self.now(), 3), "event": what, "incarnation": self.incarnation, **details}
        self.events.append(ev)
        print(f"[soak {ev['t']:7.1f}s] {what} {details or ''}", flush=True)
        return ev

    def start(self) -> None:
        self.incarnation += 1
        env = {**self.env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the engine must be a process we can kill
        log = self.log_dir / f"server-{self.incarnation}.log"
        with open(log, "w") as out:
            self.proc = subprocess.Popen([*self.command, "--port", str(self.port)], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.ready = False
        self.event("start", pid=self.proc.pid, log=str(log))

    async def wait_ready(self) -> float:
        """Until /ready answers 200; the seconds it took. Raises if the process exits or the timeout passes."""
        start = time.monotonic()
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() - start < self.startup_timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode} while starting; see "
                                       f"{self.log_dir}/server-{self.incarnation}.log")
                try:
                    if (await client.get(f"{self.url}/ready")).status_code == 200:
                        self.ready = True
                        took = time.monotonic() - start
                        self.event("ready", startup_s=round(took, 2), pid=self.proc.pid)
                        return took
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"server not ready after {self.startup_timeout:.0f} s")

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def kill_engine(self) -> dict:
        """SIGKILL the EngineCore child of the running server: the fault."""
        pid = engine_core_pid(self.proc.pid)
        if pid is None:
            raise RuntimeError(f"no EngineCore child of server {self.proc.pid}: "
                               f"{[describe_process(c) for c in children(self.proc.pid)]}")
        os.kill(pid, signal.SIGKILL)
        return self.event("engine_killed", engine_pid=pid, server_pid=self.proc.pid)

    async def restart(self, why: str, **details) -> None:
        self.event("restart", reason=why, **details)
        self.kill_group()  # the whole group: an exited server can leave its engine child behind
        self.start()
        await self.wait_ready()

    async def run(self, poll: float = 0.5) -> None:
        """The watch loop: restart on exit, and on /ready non-200 for more than `unready_grace` seconds."""
        unready_since: float | None = None
        async with httpx.AsyncClient(timeout=2) as client:
            while not self._stopping:
                await asyncio.sleep(poll)
                if self._stopping:
                    return
                code = self.proc.poll()
                if code is not None:
                    self.event("exited", returncode=code, pid=self.proc.pid)
                    await self.restart("process exited", returncode=code)
                    unready_since = None
                    continue
                try:
                    status = (await client.get(f"{self.url}/ready")).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if status == 200:
                    unready_since = None
                    continue
                if unready_since is None:
                    unready_since = self.now()
                    self.event("unready", status=status)
                elif self.now() - unready_since > self.unready_grace and self.proc.poll() is None:
                    await self.restart(f"/ready not 200 for {self.unready_grace:g} s", status=status)
                    unready_since = None

    def stop(self) -> int | None:
        """SIGTERM the server (its exit code is recorded), SIGKILL the group if it lingers."""
        self._stopping = True
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.event("stop_timeout")
        code = self.proc.poll()
        self.kill_group()  # whatever is left of the group (the engine child)
        self.event("stopped", returncode=code)
        return code


async def sample_resources(sup: Supervisor, samples: list[dict], every: float, stop: asyncio.Event) -> None:
    """Every `every` seconds: RSS (and its anonymous part) and open fds of the server process and of its
    EngineCore child."""
    while not stop.is_set():
        pid = sup.proc.pid if sup.proc is not None and sup.proc.poll() is None else None
        if pid is not None:
            engine = engine_core_pid(pid)
            row = {"t": round(sup.now(), 2), "incarnation": sup.incarnation, "server_pid": pid}
            for who, p in (("server", pid), ("engine", engine)):
                rss, anon = memory_mib(p) if p else (None, None)
                row.update({f"{who}_rss_mib": None if rss is None else round(rss, 1),
                            f"{who}_anon_mib": None if anon is None else round(anon, 1),
                            f"{who}_fds": open_fds(p) if p else None})
            if row["server_rss_mib"] is not None:  # else the server exited between poll() and the read
                samples.append(row)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


def serve_command(a) -> list[str]:
    """`steerserve serve` with the soak's engine settings (without --port: the supervisor adds it)."""
    return [sys.executable, "-m", "steerserve.server", "serve", "--model", str(a.model), "--dtype", a.dtype,
            "--max-model-len", str(a.max_model_len), "--max-num-seqs", str(a.max_num_seqs), "--kv-cache-gib",
            str(a.kv_cache_gib), "--enforce-eager", "--enable-prefix-caching", "--log-level", "warning",
            "--api-keys", str(a.keys_file), "--data-dir", str(a.data_dir), "--enable-lora", "--max-loras", "2",
            "--max-lora-rank", "8", "--max-cpu-loras", "4"]
