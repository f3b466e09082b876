"""Spawned instances: start them from the ini files, restart, roll and stop them.

Each instance is a process of its own (``python -m
pyramid_lb.dispatcher.instance INI PORT``) in its own session, so a Ctrl-C
in the terminal reaches only the dispatcher, which stops them in order. It
cannot outlive the dispatcher: it asks the kernel for a signal when its
parent dies, and watches its parent besides.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyramid_lb.dispatcher.cluster import DOWN, FAILED, STARTING, UP, Backend, Cluster

log = logging.getLogger("pyramid_lb.dispatcher")

#: Lines of an instance's output kept to explain why it failed.
KEPT_LINES = 20


class Instance:
    """One spawned process of an ini file, and its backend in the cluster."""

    def __init__(self, id: str, ini: str, port: int, backend: Backend):
        self.id = id
        self.ini = ini
        self.port = port
        self.backend = backend
        self.process: subprocess.Popen | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
        self.started_at = 0.0
        #: When it exited or was killed unasked, for ``max_restarts``.
        self.crashes: collections.deque[float] = collections.deque()
        self.failures = 0  # in a row, for the backoff
        self.restart_at: float | None = None
        self.restarts = 0
        self.failed = False
        #: Being stopped on purpose (or started by a rollout that watches it):
        #: the monitor leaves it alone.
        self.managed = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def last_output(self) -> str:
        return "\n".join(f"    {line}" for line in self.output) or "    (no output)"


class Supervisor:
    """Spawns instances of ini files into a cluster and keeps them serving."""

    def __init__(
        self,
        cluster: Cluster,
        copies: int = 0,
        main_ini: str | None = None,
        ini_files: Iterable[str] = (),
        base_port: int = 6544,
        startup_timeout: float = 30.0,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        drain_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        fall: int = 3,
        backend_options: dict | None = None,
        out=None,
    ):
        self.cluster = cluster
        self.main_ini = main_ini
        self.plan = [main_ini] * copies + list(ini_files)
        self.base_port = base_port
        self.startup_timeout = startup_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.drain_timeout = drain_timeout
        self.stop_timeout = stop_timeout
        self.fall = fall
        self.backend_options = backend_options or {}
        self._out = out or sys.stderr
        self.instances: list[Instance] = []
        self._lock = threading.RLock()
        self._rolling = threading.Lock()
        self._numbers = collections.Counter()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        # Every instance is started from this one long-lived thread: Linux
        # sends an instance its parent-death signal when the *thread* that
        # started it ends, and a rolling restart runs in a short-lived one.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="pyramid_lb-spawn")

    # -- starting -------------------------------------------------------------

    def start(self) -> None:
        for ini in self.plan:
            self._spawn(self._new_instance(ini))
        self._monitor = threading.Thread(
            target=self._watch, name="pyramid_lb-supervisor", daemon=True
        )
        self._monitor.start()

    def planned(self) -> list[tuple[str, str, int]]:
        """``(id, ini, port)`` of the instances :meth:`start` spawns, where
        their ports are free (what an export to nginx or HAProxy fronts)."""
        numbers: collections.Counter = collections.Counter()
        return [
            (_next_id(numbers, ini), ini, self.base_port + index)
            for index, ini in enumerate(self.plan)
        ]

    def _new_instance(self, ini: str) -> Instance:
        with self._lock:
            port = self._free_port()
            backend = Backend(
                f"http://127.0.0.1:{port}",
                name=_next_id(self._numbers, ini),
                state=STARTING,
                **self.backend_options,
            )
            instance = Instance(backend.name, ini, port, backend)
            self.instances.append(instance)
        self.cluster.add(backend)
        return instance

    def _free_port(self) -> int:
        taken = {instance.port for instance in self.instances}
        port = self.base_port
        while True:
            if port > 65535:
                raise RuntimeError(f"no free port from base_port = {self.base_port}")
            if port not in taken and _bindable(port):
                return port
            if port not in taken:
                log.warning("port %d is in use; trying the next one", port)
            port += 1

    def _spawn(self, instance: Instance) -> None:
        self._spawner.submit(self._start_process, instance).result()

    def _start_process(self, instance: Instance) -> None:
        env = dict(
            os.environ,
            PYRAMID_LB_INSTANCE=instance.id,
            PYRAMID_LB_TRUSTED_PROXIES="127.0.0.1 ::1",
            PYRAMID_LB_PARENT=str(os.getpid()),
            PYTHONUNBUFFERED="1",
        )
        argv = [
            sys.executable,
            "-m",
            "pyramid_lb.dispatcher.instance",
            instance.ini,
            str(instance.port),
        ]
        instance.restart_at = None
        instance.started_at = time.monotonic()
        self.cluster.set_state(instance.backend, STARTING, "spawned")
        backend = instance.backend
        backend.passes = backend.fails = backend.live_fails = 0
        backend.check_liveness = False  # from its first readiness on
        instance.output.clear()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        instance.process = process
        log.info(
            "instance %s: started (pid %d, port %d, %s)",
            instance.id,
            process.pid,
            instance.port,
            instance.ini,
        )
        threading.Thread(
            target=self._pump,
            args=(instance, process),
            name=f"pyramid_lb-output-{instance.id}",
            daemon=True,
        ).start()

    def _pump(self, instance: Instance, process: subprocess.Popen) -> None:
        """Copy the instance's output to ours, each line prefixed with its id."""
        prefix = f"{instance.id} | "
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            instance.output.append(line)
            try:
                self._out.write(prefix + line + "\n")
                self._out.flush()
            except (OSError, ValueError):  # our own output is gone
                pass
        process.stdout.close()

    # -- watching -------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.check()
            except Exception:  # never let the supervisor die
                log.exception("supervising the instances failed")

    def check(self) -> None:
        """One round of supervision: crashes, restarts, start-up, liveness."""
        now = time.monotonic()
        for instance in list(self.instances):
            if instance.managed or instance.failed:
                continue
            backend = instance.backend
            if instance.restart_at is not None:
                if now >= instance.restart_at:
                    instance.restarts += 1
                    self._spawn(instance)
                continue
            code = instance.process.poll()
            if code is not None:
                self._crashed(instance, f"exited with code {code}")
            elif backend.state != STARTING and backend.live_fails >= self.fall:
                self._kill(instance)
                self._crashed(
                    instance,
                    f"hung: its liveness check failed {backend.live_fails} times "
                    "in a row; killed",
                )
            elif backend.state == UP:
                instance.failures = 0  # it made it: the backoff starts over
                backend.check_liveness = True
            elif (
                backend.state == STARTING
                and now - instance.started_at > self.startup_timeout
            ):
                self._kill(instance)
                self._crashed(
                    instance,
                    f"not ready after {self.startup_timeout:g}s "
                    f"(last check: {_last_check(backend)}); killed",
                )

    def _crashed(self, instance: Instance, why: str) -> None:
        """Take a failed instance out, then restart it later or give up."""
        now = time.monotonic()
        instance.backend.check_liveness = False
        self.cluster.set_state(instance.backend, DOWN, why)
        crashes = instance.crashes
        crashes.append(now)
        while crashes and now - crashes[0] > self.restart_window:
            crashes.popleft()
        if len(crashes) > self.max_restarts:
            instance.failed = True
            self.cluster.set_state(instance.backend, FAILED, why)
            log.error(
                "instance %s failed: %s, %d times within %gs; not restarting it. "
                "Its last output:\n%s",
                instance.id,
                why,
                len(crashes),
                self.restart_window,
                instance.last_output(),
            )
            return
        instance.failures += 1
        # Exponential backoff with jitter, so a crashing app is not restarted
        # in a tight loop and instances crashing together do not restart in
        # step.
        delay = min(0.5 * 2 ** (instance.failures - 1), 30.0)
        delay *= random.uniform(0.75, 1.25)
        instance.restart_at = now + delay
        log.warning(
            "instance %s %s; restarting it in %.1fs. Its last output:\n%s",
            instance.id,
            why,
            delay,
            instance.last_output(),
        )

    # -- stopping -------------------------------------------------------------

    def _kill(self, instance: Instance) -> None:
        _signal_group(instance.process, signal.SIGKILL)
        instance.process.wait()

    def _terminate(self, instance: Instance) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; waits for the end."""
        process = instance.process
        if process is None or process.poll() is not None:
            return
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "instance %s did not stop within %gs of SIGTERM; killing it",
                instance.id,
                self.stop_timeout,
            )
            _signal_group(process, signal.SIGKILL)
            process.wait()
        # Whatever it started is stopped with it.
        _signal_group(process, signal.SIGKILL)

    def retire(self, instance: Instance) -> None:
        """Drain ``instance``, then stop it and take it out of the cluster."""
        instance.managed = True
        backend = instance.backend
        backend.check_liveness = False
        self.cluster.hold(backend)
        deadline = time.monotonic() + self.drain_timeout
        while backend.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if backend.in_flight:
            log.warning(
                "instance %s still had %d requests in flight after %gs of draining",
                instance.id,
                backend.in_flight,
                self.drain_timeout,
            )
        self._terminate(instance)
        self.cluster.remove(backend)
        with self._lock:
            if instance in self.instances:
                self.instances.remove(instance)
        log.info("instance %s: stopped", instance.id)

    def stop(self) -> None:
        """Stop supervising and stop every instance (SIGTERM, then SIGKILL)."""
        self._stop.set()
        if (
            self._monitor is not None
            and self._monitor is not threading.current_thread()
        ):
            self._monitor.join(2)
        instances = list(self.instances)
        for instance in instances:
            instance.managed = True
            self.cluster.hold(instance.backend)
            if instance.running:
                _signal_group(instance.process, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for instance in instances:
            if instance.process is None:
                continue
            try:
                instance.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "instance %s: killed after %gs", instance.id, self.stop_timeout
                )
            _signal_group(instance.process, signal.SIGKILL)
            instance.process.wait()
        self._spawner.shutdown(wait=False)

    # -- rolling restart and scaling ------------------------------------------

    def rolling_restart(self) -> bool:
        """Replace every instance, one at a time; False if it had to stop.

        Each replacement must become ready before the instance it replaces
        is drained and stopped; one that does not stops the rollout and is
        thrown away, and the remaining old instances keep serving.
        """
        if not self._rolling.acquire(blocking=False):
            log.warning("a rolling restart is already under way")
            return False
        try:
            log.info("rolling restart of %d instances", len(self.instances))
            for old in list(self.instances):
                if not self._replace(old, "rolling restart"):
                    return False
            log.info("rolling restart done")
            return True
        finally:
            self._rolling.release()

    def restart(self, instance_id: str) -> bool:
        """Replace one instance the way a rolling restart does."""
        instance = next((i for i in self.instances if i.id == instance_id), None)
        if instance is None:
            raise LookupError(f"no spawned instance {instance_id!r}")
        with self._rolling:
            return self._replace(instance, f"restart of {instance_id}")

    @property
    def rolling(self) -> bool:
        """Whether a rolling restart (or a restart) is under way."""
        return self._rolling.locked()

    def _replace(self, old: Instance, what: str) -> bool:
        new = self._new_instance(old.ini)
        new.managed = True
        self._spawn(new)
        problem = self._wait_ready(new)
        if problem:
            self.retire(new)
            log.error(
                "%s stopped: %s %s; the old instances keep serving. Its last "
                "output:\n%s",
                what,
                new.id,
                problem,
                new.last_output(),
            )
            return False
        new.managed = False
        self.retire(old)
        log.info("instance %s replaced by %s", old.id, new.id)
        return True

    def _wait_ready(self, instance: Instance) -> str | None:
        """None once ``instance`` takes requests, else what went wrong."""
        deadline = instance.started_at + self.startup_timeout
        while instance.backend.state != UP:
            if instance.process.poll() is not None:
                return f"exited with code {instance.process.returncode}"
            if time.monotonic() > deadline:
                return (
                    f"was not ready after {self.startup_timeout:g}s "
                    f"(last check: {_last_check(instance.backend)})"
                )
            time.sleep(0.05)
        return None

    def scale(self, count: int) -> int:
        """Run ``count`` copies of the main ini file; returns the change."""
        if self.main_ini is None:
            raise ValueError("scaling needs instances = N (copies of the ini file)")
        if count < 0:
            raise ValueError("the number of instances cannot be negative")
        copies = [i for i in self.instances if i.ini == self.main_ini]
        change = count - len(copies)
        if change > 0:
            for _ in range(change):
                self._spawn(self._new_instance(self.main_ini))
        for instance in reversed(copies[count:]):
            instance.managed = True
            threading.Thread(target=self.retire, args=(instance,), daemon=True).start()
        if change:
            log.info("scaled to %d instances of %s", count, self.main_ini)
        return change

    def describe(self) -> list[dict]:
        """What the dashboard and stats show of each instance."""
        return [
            {
                "id": instance.id,
                "pid": instance.pid,
                "port": instance.port,
                "ini": instance.ini,
                "restarts": instance.restarts,
                "failed": instance.failed,
            }
            for instance in list(self.instances)
        ]


def _next_id(numbers: collections.Counter, ini: str) -> str:
    """The next instance id of ``ini``: ``<its stem>-<n>``, n from 1."""
    stem = Path(ini).stem
    numbers[stem] += 1
    return f"{stem}-{numbers[stem]}"


def _last_check(backend: Backend) -> str:
    return backend.last_check[2] if backend.last_check else "none yet"


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """Signal the instance's process group (it leads one of its own)."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
