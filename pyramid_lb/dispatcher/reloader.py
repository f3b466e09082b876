"""``pyramid-lb serve --reload``: a change to the app's code or ini files
becomes a rolling restart.

``pserve --reload`` (hupper) restarts the one process, dropping what it was
serving and serving nothing until the new code has loaded. Here the
instances are replaced one at a time, each new one ready before an old one
drains, so no request is lost; new code that does not load stops the
rollout, and the old instances go on serving.

Which files: the ini files, and every module each instance imported while
loading the app (as hupper's worker finds them, outside the standard
library and site-packages). An instance writes that list to a file of its
own in a directory the dispatcher names (:data:`MODULES_ENV`), after the app
has loaded or failed to load, the files in the traceback included: fixing
the file a syntax error is in is a change to a watched file. The watching
itself is hupper's: watchman or watchdog when installed, else polling.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable

import hupper.logger
import hupper.reloader
import hupper.worker

from pyramid_lb.dispatcher.operations import Busy
from pyramid_lb.process import MODULES_ENV

log = logging.getLogger("pyramid_lb.dispatcher")

#: Seconds to wait after a change for the rest of it: an editor or a
#: checkout writes several files, or one file in several steps.
SETTLE = 0.3
#: Seconds between looks at the instances' lists of files (and between
#: scans, for hupper's polling monitor).
INTERVAL = 1.0


def write_module_list(instance_id: str, failure: BaseException | None = None):
    """In an instance: write the files it imported (and those in ``failure``'s
    traceback) where the dispatcher watching for changes reads them."""
    where = os.environ.get(MODULES_ENV)
    if not where:
        return
    paths = set(hupper.worker.expand_source_paths(hupper.worker.iter_module_paths()))
    if failure is not None:
        frames = traceback.extract_tb(failure.__traceback__)
        paths.update(os.path.abspath(frame.filename) for frame in frames)
        if isinstance(failure, SyntaxError) and failure.filename:
            paths.add(os.path.abspath(failure.filename))
    system = tuple(hupper.worker.get_system_paths())
    kept = sorted(
        path
        for path in paths
        if os.path.isfile(path) and not os.path.realpath(path).startswith(system)
    )
    # Whole or not at all: the dispatcher may read it at any moment.
    handle, temporary = tempfile.mkstemp(dir=where, prefix=".", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write("\n".join(kept) + "\n")
    os.replace(temporary, os.path.join(where, f"{instance_id}.files"))


class Reloader:
    """Watches ``paths`` and the instances' lists of files, and calls
    ``rolling_restart(why)`` once things have settled after a change.

    A file has changed when its mtime is later than when it was last seen:
    for a listed file, when the instance that imported it wrote its list.
    The monitor (hupper's) says which files to look at; files new to it are
    looked at for a while by this class too, since a monitor only sees
    changes after its own first look at a file.

    ``rolling_restart`` raises Busy when another operation runs: the
    restart is then tried again until it is taken. A change during a
    rollout brings another rollout after it, so the last edit always wins.
    """

    def __init__(
        self,
        paths: Iterable[str],
        rolling_restart: Callable[[str], object],
        monitor_factory=None,
    ):
        self.rolling_restart = rolling_restart
        self.modules_dir = tempfile.mkdtemp(prefix="pyramid_lb-reload-")
        self._reported: list[str] = []  # by the monitor, in its thread
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lists: dict[str, float] = {}  # list file -> its mtime when read
        #: Each watched file's mtime as last seen.
        self.seen: dict[str, float] = {}
        self._new: dict[str, float] = {}  # recently watched -> since when
        if monitor_factory is None:
            quiet = hupper.logger.DefaultLogger(hupper.logger.LogLevel.ERROR)
            monitor_factory = hupper.reloader.find_default_monitor_factory(quiet)
        self._monitor = monitor_factory(
            self._on_change, interval=INTERVAL, logger=hupper.logger.SilentLogger()
        )
        self.watch(os.path.abspath(p) for p in paths)
        self._thread = threading.Thread(
            target=self._run, name="pyramid_lb-reloader", daemon=True
        )

    def start(self) -> None:
        self._monitor.start()
        self._thread.start()
        log.info(
            "--reload: a change to %s, or to a module an instance loaded, "
            "replaces the instances one at a time",
            " or ".join(sorted(os.path.basename(p) for p in self.seen)) or "nothing",
        )

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._monitor.stop()
        for name in os.listdir(self.modules_dir):
            os.unlink(os.path.join(self.modules_dir, name))
        os.rmdir(self.modules_dir)

    def watch(self, paths: Iterable[str], since: float | None = None) -> None:
        """Watch ``paths`` for changes after ``since`` (default: from now)."""
        now = time.monotonic()
        for path in paths:
            if path in self.seen:
                continue
            self.seen[path] = _mtime(path) if since is None else since
            self._new[path] = now
            self._monitor.add_path(path)

    def _on_change(self, path: str) -> None:
        with self._lock:
            self._reported.append(path)
        self._wake.set()

    def _read_lists(self) -> None:
        """Watch what the instances said they imported, since last time."""
        for entry in os.scandir(self.modules_dir):
            if not entry.name.endswith(".files"):
                continue
            mtime = entry.stat().st_mtime
            if self._lists.get(entry.path) == mtime:
                continue
            self._lists[entry.path] = mtime
            with open(entry.path, encoding="utf-8") as listed:
                paths = [line for line in listed.read().splitlines() if line]
            # Imported before the list was written: changed if later.
            self.watch(paths, since=mtime)

    def _changes(self) -> list[str]:
        """The watched files changed since last seen, among those the monitor
        reported and those it may not have looked at yet."""
        with self._lock:
            candidates = set(self._reported)
            self._reported.clear()
        now = time.monotonic()
        for path, since in list(self._new.items()):
            if now - since > 3 * INTERVAL:
                del self._new[path]
        changed = []
        for path in sorted(candidates | self._new.keys()):
            mtime = _mtime(path)
            if path in self.seen and mtime > self.seen[path]:
                self.seen[path] = mtime
                changed.append(path)
        return changed

    def _run(self) -> None:
        pending: list[str] = []
        while not self._stop.is_set():
            self._read_lists()
            self._wake.wait(INTERVAL)
            if self._wake.is_set():
                self._stop.wait(SETTLE)  # and take what came meanwhile too
                self._wake.clear()
            pending += [p for p in self._changes() if p not in pending]
            if self._stop.is_set() or not pending:
                continue
            names = sorted({os.path.basename(p) for p in pending})
            why = f"{', '.join(names[:3])}{' and more' if names[3:] else ''} changed"
            try:
                self.rolling_restart(why)
            except Busy:
                continue  # a rollout is under way: after it, then
            pending = []


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:  # gone (for now: an editor saving by renaming)
        return 0.0
