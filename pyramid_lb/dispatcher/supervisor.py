"""Spawned instances: start them from the ini files, restart, roll and stop them.

Each instance is a process of its own (``python -m
pyramid_lb.dispatcher.instance INI PORT``) in its own session, so a Ctrl-C
in the terminal reaches only the dispatcher, which stops them in order. It
cannot outlive the dispatcher: it asks the kernel for a signal when its
parent dies, and watches its parent besides.

Its output is copied to the dispatcher's as it comes, each line prefixed with
its id. The first start is a canary: one instance, and the others once it is
ready; if it fails before that, the app does not start (its error is on
screen once), and the supervisor gives up instead of restarting it
(``on_fatal``), as gunicorn does when a worker cannot boot.

An instance that has served ``max_requests`` requests, or whose resident
memory is above ``max_memory``, is recycled (a leak is cut short): replaced
the way a rolling restart does it, one at a time and only while every
instance is ready, so that as many serve meanwhile as ever.
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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyramid_lb.dispatcher.checks import HealthChecker
from pyramid_lb.dispatcher.cluster import DOWN, FAILED, STARTING, UP, Backend, Cluster
from pyramid_lb.dispatcher.config import AUTO
from pyramid_lb.dispatcher.operations import Busy, Operations
from pyramid_lb.notify import Notifier
from pyramid_lb.process import (
    INSTANCE_ENV,
    MODULES_ENV,
    PARENT_ENV,
    PORT_IN_USE,
    TRUSTED_PROXIES_ENV,
    server_threads,
)

log = logging.getLogger("pyramid_lb.dispatcher")

#: What each instance runs (``python -m``), and the name its errors begin with.
INSTANCE_PROG = "pyramid_lb.dispatcher.instance"

#: Lines of an instance's output kept to explain why it failed.
KEPT_LINES = 20
#: Seconds between two reads of an instance's memory (for ``max_memory``).
MEMORY_READ_INTERVAL = 1.0
#: Seconds before an instance whose recycling failed (its replacement never
#: got ready: a broken deploy, say) is tried again, so that it does not hold
#: the operations, which a rolling restart with the fix needs, all the time.
RECYCLE_RETRY_AFTER = 30.0
#: Seconds between the end of a recycle and the start of the next, so that
#: an operator's reload, scale or drain is not refused for as long as
#: instances keep coming due.
RECYCLE_GAP = 2.0


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
        self.crashes_in_a_row = 0  # for the backoff
        self.restart_at: float | None = None
        self.restarts = 0
        self.failed = False
        #: Being stopped on purpose (or started by a rollout that watches it):
        #: the monitor leaves it alone.
        self.managed = False
        #: Requests its process may serve before it is recycled (0: no limit),
        #: counted from ``requests_at_start`` (its backend's count then).
        self.request_limit = 0
        self.requests_at_start = 0
        #: Its resident memory in bytes as last read, and when (monotonic).
        self.memory: int | None = None
        self.memory_read_at = 0.0
        #: No recycling before this (monotonic), after one failed.
        self.recycle_after = 0.0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Spawns instances of ini files into a cluster and keeps them serving."""

    def __init__(
        self,
        cluster: Cluster,
        checker: HealthChecker,
        instances: int = 0,
        main_ini: str | None = None,
        ini_files: Iterable[str] = (),
        base_port: int = 6544,
        startup_timeout: float = 30.0,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        drain_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        backend_options: dict | None = None,
        out=None,
        operations: Operations | None = None,
        on_fatal: Callable[[str], None] | None = None,
        fixed_ports: bool = False,
        max_requests: int = 0,
        max_requests_jitter: int = 0,
        max_memory: int | None = None,
        max_in_flight: int | str | None = AUTO,
    ):
        self.cluster = cluster
        #: Asked whether an instance is hung, told when one is spawned.
        self.checker = checker
        self.main_ini = main_ini
        self.plan = [main_ini] * instances + list(ini_files)
        self.base_port = base_port
        #: Each instance keeps the port it was planned on, for a front whose
        #: configuration names them (``--no-dispatcher``): one in use is an
        #: error rather than a reason to move, and a replacement takes the
        #: port over from the instance it replaces.
        self.fixed_ports = fixed_ports
        self.startup_timeout = startup_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.drain_timeout = drain_timeout
        self.stop_timeout = stop_timeout
        self.backend_options = backend_options or {}
        #: Recycling: requests served (plus up to the jitter, drawn per
        #: process), resident memory in bytes; 0 and None: never.
        self.max_requests = max_requests
        self.max_requests_jitter = max_requests_jitter
        self.max_memory = max_memory
        #: Each backend's cap; ``auto``: its ini file's waitress threads.
        self.max_in_flight = max_in_flight
        self._threads: dict[str, int] = {}  # ini path -> server_threads()
        #: Completed recycles by reason (``max_requests``, ``max_memory``).
        self.recycled: collections.Counter[str] = collections.Counter()
        self._next_recycle = 0.0  # monotonic: not before (RECYCLE_GAP)
        self._out = out or sys.stderr
        #: Told of rolling restarts (systemd's RELOADING=1), silent by default.
        self.notifier = Notifier()
        #: Where instances list the files they imported (``--reload``), or None.
        self.modules_dir: str | None = None
        #: The instances running or being started, in the order they came.
        self.spawned: list[Instance] = []
        self._lock = threading.RLock()
        #: Rolling restarts, restarts and scaling, one at a time.
        self.operations = operations or Operations()
        #: Told why, when the app fails at the first start (then nothing is
        #: restarted); without it, that is only logged.
        self.on_fatal = on_fatal
        self.boot_failure: str | None = None
        #: Whether an instance has been ready yet; until then the rest of the
        #: plan waits.
        self._booted = False
        self._after_canary: list[str] = []
        self._numbers = collections.Counter()
        #: Ports found in use and said so (at start-up): not said again.
        self._told_in_use: set[int] = set()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        # Every instance is started from this one long-lived thread: Linux
        # sends an instance its parent-death signal when the *thread* that
        # started it ends, and a rolling restart runs in a short-lived one.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="pyramid_lb-spawn")

    # -- starting -------------------------------------------------------------

    def start(self) -> None:
        """Spawn the planned instances, then supervise them.

        Raises RuntimeError, before spawning any, when the ports from
        ``base_port`` on cannot hold them all.
        """
        last = self.base_port + len(self.plan) - 1
        if last > 65535:
            raise RuntimeError(
                f"base_port = {self.base_port} leaves no room for {len(self.plan)} "
                f"instances: they need ports up to {last}, and the last TCP port "
                "is 65535"
            )
        first, *self._after_canary = self.plan
        self._spawn_all([first])
        self._monitor = threading.Thread(
            target=self._watch, name="pyramid_lb-supervisor", daemon=True
        )
        self._monitor.start()

    def _spawn_all(self, inis: list[str]) -> None:
        """Spawn an instance of each of ``inis``, telling once of ports in use."""
        skipped: list[int] = []
        started = [self._new_instance(ini, skipped) for ini in inis]
        for instance in started:
            self._spawn(instance)
        news = [port for port in skipped if port not in self._told_in_use]
        if news:
            self._told_in_use.update(news)
            log.info(
                "ports %s are in use: the instances listen on %s",
                _ports(news),
                _ports(instance.port for instance in started),
            )

    def planned(self) -> list[tuple[str, str, int]]:
        """``(id, ini, port)`` of the instances :meth:`start` spawns, where
        their ports are free (what an export to nginx or HAProxy fronts)."""
        numbers: collections.Counter = collections.Counter()
        return [
            (_next_id(numbers, ini), ini, self.base_port + index)
            for index, ini in enumerate(self.plan)
        ]

    def _new_instance(
        self, ini: str, skipped: list[int] | None = None, name: str | None = None
    ) -> Instance:
        """A new instance of ``ini`` on a free port, not started yet, called
        ``name`` (else the next id of its file).

        Ports found in use go to ``skipped``, for the caller to tell once;
        without it, they are told here with the port chosen.
        """
        with self._lock:
            passed: list[int] = [] if skipped is None else skipped
            port = self._free_port(passed)
            backend = Backend(
                f"http://127.0.0.1:{port}",
                name=name or _next_id(self._numbers, ini),
                state=STARTING,
                max_in_flight=self.in_flight_cap(ini),
                **self.backend_options,
            )
            instance = Instance(backend.name, ini, port, backend)
            self.spawned.append(instance)
        news = [port for port in passed if port not in self._told_in_use]
        if skipped is None and news:
            self._told_in_use.update(news)
            log.info(
                "instance %s: ports %s are in use; it listens on %d",
                instance.id,
                _ports(news),
                port,
            )
        self.cluster.add(backend)
        return instance

    def in_flight_cap(self, ini: str) -> int | None:
        """The ``max_in_flight`` of an instance of ``ini``: with ``auto``, its
        waitress threads (read once per file: a reload keeps the first
        count). What the dispatcher sizes its threads by and the exports
        write, too."""
        if self.max_in_flight != AUTO:
            return self.max_in_flight
        if ini not in self._threads:
            self._threads[ini] = server_threads(ini)
        return self._threads[ini]

    def _free_port(self, skipped: list[int]) -> int:
        """The first port from ``base_port`` that no instance has and that is
        free; those in use on the way are added to ``skipped`` (once each)."""
        taken = {instance.port for instance in self.spawned}
        port = self.base_port
        while True:
            if port > 65535:
                raise RuntimeError(
                    f"no free port from base_port = {self.base_port} to 65535"
                )
            if port not in taken:
                if self.fixed_ports or _bindable(port):
                    return port
                if port not in skipped:
                    skipped.append(port)
            port += 1

    def _spawn(self, instance: Instance) -> None:
        self._spawner.submit(self._start_process, instance).result()

    def _start_process(self, instance: Instance) -> None:
        env = {
            **os.environ,
            INSTANCE_ENV: instance.id,
            TRUSTED_PROXIES_ENV: "127.0.0.1 ::1",
            PARENT_ENV: str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        }
        if self.modules_dir:
            env[MODULES_ENV] = self.modules_dir
        argv = [
            sys.executable,
            "-m",
            INSTANCE_PROG,
            instance.ini,
            str(instance.port),
        ]
        instance.restart_at = None
        instance.started_at = time.monotonic()
        # A new process: its requests are counted from here, against a limit
        # of its own, so that instances started together are not recycled
        # together.
        instance.requests_at_start = instance.backend.requests
        if self.max_requests:
            jitter = random.randint(0, self.max_requests_jitter)
            instance.request_limit = self.max_requests + jitter
        instance.memory = None
        instance.memory_read_at = 0.0
        self.cluster.set_state(instance.backend, STARTING, "spawned")
        self.checker.spawned(instance.backend)
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

    def _boot_failed(self, instance: Instance, why: str) -> None:
        """The canary failed before it was ready: the app does not start."""
        instance.failed = True
        self.cluster.set_state(instance.backend, FAILED, why)
        said = "its output is above" if instance.output else "it printed nothing"
        self.boot_failure = (
            f"instance {instance.id} {why} before any instance was ready, so the "
            f"app does not start ({said}); not restarting it"
        )
        self._stop.set()  # nothing more to supervise: it all stops
        if self.on_fatal is None:
            log.error("%s", self.boot_failure)
        else:
            self.on_fatal(self.boot_failure)

    # -- watching -------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.check()
            except Exception:  # never let the supervisor die
                log.exception("supervising the instances failed")

    def check(self) -> None:
        """One round of supervision: crashes, restarts, start-up, liveness,
        recycling."""
        now = time.monotonic()
        if not self._booted and any(i.backend.state == UP for i in self.spawned):
            self._booted = True
            self._spawn_all(self._after_canary)
        for instance in list(self.spawned):
            if self.boot_failure is not None:
                return
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
                if not self._moved(instance):
                    self._crashed(instance, self._exit_reason(instance))
            elif backend.state != STARTING and self.checker.hung(backend):
                self._kill(instance)
                self._crashed(
                    instance,
                    f"hung: its liveness check failed {self.checker.fall} times "
                    "in a row; killed",
                )
            elif backend.state == UP:
                instance.crashes_in_a_row = 0  # it made it: the backoff starts over
            elif (
                backend.state == STARTING
                and now - instance.started_at > self.startup_timeout
            ):
                self._kill(instance)
                self._crashed(
                    instance,
                    f"not ready after {self.startup_timeout:g}s "
                    f"(last check: {_last_check(self.checker, backend)}); killed",
                )
        if self._booted and self.boot_failure is None:
            self._recycle(now)

    def _moved(self, instance: Instance) -> bool:
        """Whether ``instance`` exited because its port was taken after it was
        found free (by another program, or another supervisor starting at the
        same time); then it is started again on another port at once. That
        is no crash of the app: nothing is counted against it."""
        if instance.process.returncode != PORT_IN_USE or self.fixed_ports:
            return False
        with self._lock:
            port = self._free_port([])
        log.info(
            "instance %s: port %d was taken meanwhile; it moves to %d",
            instance.id,
            instance.port,
            port,
        )
        instance.port = port
        self.cluster.move(instance.backend, port)
        self._spawn(instance)
        return True

    def _exit_reason(self, instance: Instance, quote: bool = False) -> str:
        """Why ``instance`` exited; with ``quote``, in its own words too, when
        it said why in its last line (that the app did not load, say): for
        a rollout's one line, which comes after the instance's output."""
        code = instance.process.returncode
        if code == PORT_IN_USE:
            return (
                f"could not listen: port {instance.port} is in use by another "
                "program (the front's configuration sends requests there)"
            )
        said = instance.output[-1] if instance.output else ""
        prefix = f"{INSTANCE_PROG}: error: "
        if quote and said.startswith(prefix):
            return f"exited with code {code}: {said[len(prefix) :]}"
        return f"exited with code {code}"

    def _crashed(self, instance: Instance, why: str) -> None:
        """Take a failed instance out, then restart it later or give up.

        Its output was shown as it came, so it is not repeated here.
        """
        if not self._booted:
            self._boot_failed(instance, why)
            return
        now = time.monotonic()
        self.checker.forget(instance.backend)
        self.cluster.set_state(instance.backend, DOWN, why)
        crashes = instance.crashes
        crashes.append(now)
        while crashes and now - crashes[0] > self.restart_window:
            crashes.popleft()
        if len(crashes) > self.max_restarts:
            instance.failed = True
            self.cluster.set_state(instance.backend, FAILED, why)
            log.error(
                "instance %s failed: %s, %d times within %gs; not restarting it",
                instance.id,
                why,
                len(crashes),
                self.restart_window,
            )
            return
        instance.crashes_in_a_row += 1
        # Exponential backoff with jitter, so a crashing app is not restarted
        # in a tight loop and instances crashing together do not restart in
        # step.
        delay = min(0.5 * 2 ** (instance.crashes_in_a_row - 1), 30.0)
        delay *= random.uniform(0.75, 1.25)
        instance.restart_at = now + delay
        log.warning("instance %s %s; restarting it in %.1fs", instance.id, why, delay)

    # -- recycling ------------------------------------------------------------

    def _recycle(self, now: float) -> None:
        """Start recycling the oldest instance due for it, if any.

        Only while every instance takes requests and no other operation runs:
        its replacement is ready before it is drained, so as many instances
        as ever serve, and a rollout or a scale is not stepped on. One that
        must wait is found due again on a later round.
        """
        if not (self.max_requests or self.max_memory) or self._stop.is_set():
            return
        if self.operations.running is not None or now < self._next_recycle:
            return
        instances = list(self.spawned)
        if not instances or any(
            i.managed or i.failed or i.backend.state != UP or i.backend.held
            for i in instances
        ):
            return
        for instance in instances:  # the oldest first
            due = self._due(instance, now) if now >= instance.recycle_after else None
            if due is not None:
                break
        else:
            return
        reason, why = due
        what = f"recycling of {instance.id}"
        try:
            self.operations.run(
                what,
                lambda: self._recycled(instance, what, reason, why),
                background=True,
            )
        except Busy:  # claimed meanwhile (by the admin, say)
            pass

    def _due(self, instance: Instance, now: float) -> tuple[str, str] | None:
        """``(reason, why)`` when ``instance`` is to be recycled, else None."""
        served = instance.backend.requests - instance.requests_at_start
        if instance.request_limit and served >= instance.request_limit:
            extra = instance.request_limit - self.max_requests
            jitter = f", plus {extra} of max_requests_jitter" if extra else ""
            return (
                "max_requests",
                f"served {served} requests (max_requests = {self.max_requests}"
                f"{jitter})",
            )
        if self.max_memory is None:
            return None
        if now - instance.memory_read_at >= MEMORY_READ_INTERVAL:
            instance.memory_read_at = now
            instance.memory = _resident_memory(instance.pid)
        if instance.memory is not None and instance.memory > self.max_memory:
            return (
                "max_memory",
                f"its resident memory is {_megabytes(instance.memory)} "
                f"(max_memory = {_megabytes(self.max_memory)})",
            )
        return None

    def _recycled(self, instance: Instance, what: str, reason: str, why: str) -> bool:
        """Replace ``instance`` (the work of a recycling operation)."""
        if self._stop.is_set():
            return False
        log.info("instance %s: recycling it: %s", instance.id, why)
        # Should it fail (in any way), it is not tried again at once.
        instance.recycle_after = time.monotonic() + RECYCLE_RETRY_AFTER
        try:
            if not self._replace(instance, what):
                return False
        finally:
            self._next_recycle = time.monotonic() + RECYCLE_GAP
        self.recycled[reason] += 1
        if reason == "max_memory":
            self._check_memory_limit(max(self.spawned, key=lambda i: i.started_at))
        return True

    def _check_memory_limit(self, fresh: Instance) -> None:
        """A limit a fresh instance is over already would replace instances
        for ever: say so, and recycle no more for memory."""
        memory = _resident_memory(fresh.pid)
        if memory is not None and self.max_memory and memory > self.max_memory:
            log.error(
                "max_memory = %s is less than a fresh instance uses (%s for %s): "
                "no more recycling for memory; raise it",
                _megabytes(self.max_memory),
                _megabytes(memory),
                fresh.id,
            )
            self.max_memory = None

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
        self.checker.forget(backend)
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
            if instance in self.spawned:
                self.spawned.remove(instance)
        log.info("instance %s: stopped", instance.id)

    def stop(self) -> None:
        """Stop supervising and stop every instance (SIGTERM, then SIGKILL)."""
        self._stop.set()
        if (
            self._monitor is not None
            and self._monitor is not threading.current_thread()
        ):
            self._monitor.join(2)
        instances = list(self.spawned)
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

    def rolling_restart(
        self, background: bool = False, why: str | None = None
    ) -> bool | None:
        """Replace every instance, one at a time; False if it had to stop.

        Each replacement must become ready before the instance it replaces
        is drained and stopped; one that does not stops the rollout and is
        thrown away, and the remaining old instances keep serving.

        Raises :class:`~pyramid_lb.dispatcher.operations.Busy` when another
        life-cycle operation is under way. With ``background`` it goes on in
        a thread of its own once it is under way (and returns None). ``why``
        is said in the log (``rolling restart (views.py changed)``).

        The notifier says RELOADING=1 as it starts and READY=1 when it ends.
        """
        what = f"rolling restart ({why})" if why else "rolling restart"
        return self.operations.run(what, lambda: self._roll(what), background)

    def _roll(self, what: str) -> bool:
        self.notifier.reloading()
        finished = False
        try:
            for old in list(self.spawned):
                if old in self.spawned and not self._replace(old, what):
                    return False
            finished = True
            return True
        finally:
            self.notifier.reloaded(
                "done" if finished else "stopped (the old instances serve)"
            )

    def restart(self, instance_id: str, background: bool = False) -> bool | None:
        """Replace one instance the way a rolling restart does (and raise
        Busy the same way); LookupError if there is no such instance."""
        instance = next((i for i in self.spawned if i.id == instance_id), None)
        if instance is None:
            raise LookupError(f"no spawned instance {instance_id!r}")
        what = f"restart of {instance_id}"
        return self.operations.run(
            what, lambda: self._replace(instance, what), background
        )

    @property
    def rolling(self) -> bool:
        """Whether a life-cycle operation (a rolling restart, say) is under way."""
        return self.operations.running is not None

    def _replace(self, old: Instance, what: str) -> bool:
        name = None
        if self.fixed_ports:
            # The front knows this port and this id (its affinity cookie) only:
            # the new instance takes both over.
            self.retire(old)
            name = old.id
        new = self._new_instance(old.ini, name=name)
        new.managed = True
        self._spawn(new)
        problem = self._wait_ready(new)
        if problem:
            self.retire(new)
            # Its output was shown as it came: not repeated here. Stopped
            # with the rest, it is no error (a recycle may be under way then).
            if not self._stop.is_set():
                log.error(
                    "%s stopped: %s %s; the old instances keep serving",
                    what,
                    new.id,
                    problem,
                )
            return False
        new.managed = False
        if not self.fixed_ports:
            self.retire(old)
        if new.id == old.id:
            log.info("instance %s replaced in place", old.id)
        else:
            log.info("instance %s replaced by %s", old.id, new.id)
        return True

    def _wait_ready(self, instance: Instance) -> str | None:
        """None once ``instance`` takes requests, else what went wrong."""
        deadline = instance.started_at + self.startup_timeout
        while instance.backend.state != UP:
            if instance.process.poll() is not None and not self._moved(instance):
                return self._exit_reason(instance, quote=True)
            if time.monotonic() > deadline:
                return (
                    f"was not ready after {self.startup_timeout:g}s "
                    f"(last check: {_last_check(self.checker, instance.backend)})"
                )
            time.sleep(0.05)
        return None

    def scale(self, count: int) -> int:
        """Run ``count`` copies of the main ini file; returns the change.

        The new instances are started and the leaving ones (the newest)
        drained before this returns; the operation goes on in the
        background until the new ones are ready and the others stopped.
        Raises Busy when another life-cycle operation is under way.
        """
        if self.main_ini is None:
            raise ValueError("scaling needs instances = N (copies of the ini file)")
        if count < 0:
            raise ValueError("the number of instances cannot be negative")
        self.operations.claim(f"scale to {count}")
        try:
            copies = [i for i in self.spawned if i.ini == self.main_ini]
            change = count - len(copies)
            started = [self._new_instance(self.main_ini) for _ in range(change)]
            for instance in started:
                self._spawn(instance)
            leaving = list(reversed(copies[count:]))
            for instance in leaving:
                instance.managed = True
                self.cluster.hold(instance.backend)
        except BaseException:
            self.operations.release("stopped")
            raise
        threading.Thread(
            target=self._settle,
            args=(started, leaving),
            name="pyramid_lb-scale",
            daemon=True,
        ).start()
        return change

    def _settle(self, started: list[Instance], leaving: list[Instance]) -> None:
        """The rest of a scale: wait for the new instances, stop the leaving."""
        outcome = "done"
        try:
            retiring = [
                threading.Thread(target=self.retire, args=(i,), daemon=True)
                for i in leaving
            ]
            for thread in retiring:
                thread.start()
            for instance in started:
                problem = self._wait_ready(instance)
                if problem:  # the monitor restarts it as it does any other
                    log.warning("instance %s %s", instance.id, problem)
                    outcome = "done, with instances not ready yet"
            for thread in retiring:
                thread.join()
        except Exception:
            log.exception("scaling failed")
            outcome = "stopped"
        finally:
            self.operations.release(outcome)

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
            for instance in list(self.spawned)
        ]


def _next_id(numbers: collections.Counter, ini: str) -> str:
    """The next instance id of ``ini``: ``<its stem>-<n>``, n from 1."""
    stem = Path(ini).stem
    numbers[stem] += 1
    return f"{stem}-{numbers[stem]}"


def _last_check(checker: HealthChecker, backend: Backend) -> str:
    last = checker.last_check(backend)
    return last[2] if last else "none yet"


def _resident_memory(pid: int | None) -> int | None:
    """The resident memory of process ``pid`` in bytes (VmRSS in
    ``/proc/PID/status``); None where it cannot be read (it is gone, or this
    is no Linux)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # given in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _megabytes(size: int) -> str:
    return f"{size / (1 << 20):.1f} MB"


def _ports(ports: Iterable[int]) -> str:
    return ", ".join(str(port) for port in ports)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        # As waitress binds: a port whose last connections linger in
        # TIME_WAIT (an instance just replaced) is free, not in use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
