"""What `moeforge run` shows on the terminal, and where everything else goes.

By default the terminal shows the CLI's own lines (stage starts and ends, result tables) and the stages' progress
bars only. Library warnings and log records of the driver, and everything Ray relays from workers (stage tasks,
actors, Ray Train workers: their prints, warnings, third-party progress bars), go to one log file per run under
`<workdir>/logs/`, which the CLI names when something fails. `--verbose` shows all of it live as well.

Ray has no public hook to filter what it relays from workers; `route_worker_logs` swaps the driver's print handler
of Ray's log dispatcher (`ray._private.worker.global_worker_stdstream_dispatcher`) for one that keeps the
progress-bar updates of `ray.experimental.tqdm_ray` on the terminal and writes every other line to the file. If
that internal moves, the driver keeps Ray's default (everything printed) and says so in the file.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunLog:
    """One run's log file and the routing into it.

    Args:
        workdir: the run's work directory (the file goes to `<workdir>/logs/run-<time>.log`).
        verbose: also show everything live on the terminal.
    """

    def __init__(self, workdir: str | Path, verbose: bool = False):
        self.verbose = verbose
        directory = Path(workdir) / "logs"
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self._file: TextIO = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives with the run
        self._lock = threading.Lock()
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter(_FORMAT))
        self._saved: list[tuple[logging.Logger, list[logging.Handler], int, bool]] = []
        self._restore_printing: Callable[[], None] | None = None
        self._warnings = warnings.catch_warnings()
        self._last_line = time.monotonic()
        self._bars = ClosedBars()

    def install(self) -> None:
        """Send the driver's log records and warnings to the file (and, with `verbose`, to stderr as before)."""
        # importing these configures their loggers' console handlers, which are replaced here
        import mlflow  # noqa: F401
        import ray  # noqa: F401

        self._warnings.__enter__()  # the process's warning filters come back on uninstall
        logging.captureWarnings(True)
        warnings.simplefilter("default")  # each distinct warning once per location, into the file
        for name in ("", "ray", "mlflow", "alembic"):
            logger = logging.getLogger(name)
            self._saved.append((logger, list(logger.handlers), logger.level, logger.propagate))
            keep = logger.handlers if self.verbose else [h for h in logger.handlers if h.level >= logging.ERROR]
            logger.handlers = [*keep, self._handler]
            if name == "":
                logger.setLevel(logging.INFO)
                if self.verbose:  # the driver's warnings and records live too (Ray's and MLflow's keep theirs)
                    live = logging.StreamHandler(sys.stderr)
                    live.setLevel(logging.WARNING)
                    live.setFormatter(logging.Formatter(_FORMAT))
                    logger.handlers.append(live)
            else:
                logger.propagate = False

    def drain(self, quiet_s: float = 1.0, max_s: float = 5.0) -> None:
        """Wait until workers' lines stop arriving (Ray relays them a little after they are printed), so the last
        stage's output reaches the file rather than the terminal after `uninstall`."""
        if self._restore_printing is None:
            return
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline and time.monotonic() - self._last_line < quiet_s:
            time.sleep(0.1)

    def uninstall(self) -> None:
        """Put back what `install` and `route_worker_logs` changed, and close the file."""
        if self._saved:
            logging.captureWarnings(False)
            self._warnings.__exit__(None, None, None)
        for logger, handlers, level, propagate in self._saved:
            logger.handlers, logger.level, logger.propagate = handlers, level, propagate
        self._saved = []
        if self._restore_printing is not None:
            self._restore_printing()
            self._restore_printing = None
        with self._lock:
            self._file.close()

    def write_lines(self, source: str, lines: list[str]) -> None:
        with self._lock:
            if self._file.closed:
                return
            for line in lines:
                self._file.write(f"({source}) {line}\n")

    def route_worker_logs(self) -> bool:
        """After `ray.init(log_to_driver=True)`: workers' progress bars to the terminal, all else to the file."""
        try:
            from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
            from ray._private.worker import print_to_stdstream, process_tqdm
            from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
        except ImportError as e:  # Ray moved its internals: keep its default printing
            log.warning("cannot route worker logs to %s (%s); Ray prints them as usual", self.path, e)
            return False

        def handle(data: dict[str, Any]) -> None:
            self._last_line = time.monotonic()
            source = " ".join(
                str(x) for x in (data.get("actor_name") or data.get("task_name"), f"pid={data.get('pid')}") if x
            )
            lines = data.get("lines", [])
            self.write_lines(source, [line for line in lines if RAY_TQDM_MAGIC not in line])
            if self.verbose:
                print_to_stdstream(data, ignore_prefix=False)
                return
            for line in lines:
                if RAY_TQDM_MAGIC in line and self._bars.keep(line):
                    process_tqdm(line)

        previous = [h for name, h in dispatcher.handlers if name == "ray_print_logs"]
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", handle)

        def restore() -> None:
            dispatcher.remove_handler("ray_print_logs")
            for h in previous:
                dispatcher.add_handler("ray_print_logs", h)

        self._restore_printing = restore
        return True


class ClosedBars:
    """Drops the updates of progress bars that were already closed.

    A worker's bar states can reach the driver a second time (seen with Ray Train workers: the whole stream of a
    closed bar again, as it ended); `tqdm_ray` on the driver then draws it as a new bar, a second line."""

    def __init__(self) -> None:
        self._closed: set[str] = set()

    def keep(self, line: str) -> bool:
        try:
            state = json.loads(line)
        except ValueError:
            return True  # not a state: tqdm_ray reports it
        uuid = state.get("uuid")
        if uuid in self._closed:
            return False
        if state.get("closed"):
            self._closed.add(uuid)
        return True
