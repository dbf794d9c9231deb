"""The `anomaly-sidecar` command line: run, demo, evaluate and train."""

from __future__ import annotations

import argparse
import collections
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.config import Settings, check_model_files, load_settings
from sidecar.detector import load_cascade
from sidecar.errors import ConfigError, SidecarError
from sidecar.logs import configure_logging

if TYPE_CHECKING:
    from sidecar.service import Service

__all__ = ["main"]

_LOG = logging.getLogger(__name__)

# Exit codes: 2 is argparse's own for usage errors, so config errors share it.
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_FAILURE = 1
# What a service manager sends to stop us (systemd, Docker: SIGTERM) and what
# Ctrl-C sends; both stop the sidecar cleanly.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# SIGHUP reloads the config and models (the daemon convention); all three are
# held for `run` to wait on.
HELD_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}
BYTES_PER_MB = 1_000_000
# How often `run` looks at the config and model files for changes.
RELOAD_POLL_S = 2.0
# How long `run` waits for a signal between looks at the signals a handler
# caught on another thread (see `_catch_stray_signals`): a stop request that
# lands there is acted on within this.
SIGNAL_POLL_S = 0.25
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly-sidecar",
        description="Real-time anomaly detection beside an MQTT broker.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="watch a broker and publish verdicts")
    run.add_argument("--config", type=Path, help="YAML configuration file")

    demo = commands.add_parser(
        "demo", help="embedded broker + sidecar + replayed data, ends by itself"
    )
    demo.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA / "ton_iot_telemetry",
        help="TON_IoT folder; the built-in simulation is used when it is absent",
    )
    demo.add_argument("--rate", type=float, default=250.0, help="messages per second")

    evaluate = commands.add_parser("evaluate", help="score the models on held-out data")
    evaluate.add_argument(
        "--dataset",
        choices=["ton_iot", "skab", "nab", "mqttset", "csv", "simulation"],
        required=True,
    )
    evaluate.add_argument(
        "--data",
        type=Path,
        help="the dataset's folder (default: its folder under ../shared/data), "
        "or for csv the CSV / JSON-lines file",
    )
    evaluate.add_argument("--json", type=Path, help="write the results here")
    evaluate.add_argument(
        "--baselines",
        action="store_true",
        help="also score IsolationForest, HalfSpaceTrees and a z-score rule",
    )
    evaluate.add_argument(
        "--models", type=Path, help="model folder to use instead of the configured"
    )
    evaluate.add_argument(
        "--report", type=Path, help="write an HTML report with plots to this folder"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the baselines")
    evaluate.add_argument("--time-column", help="csv: time column (else guessed)")
    evaluate.add_argument("--device-column", help="csv: device column (else one)")
    evaluate.add_argument("--label-column", help="csv: 0/1 label column")
    evaluate.add_argument("--columns", help="csv: comma-separated value columns")
    evaluate.add_argument(
        "--fit-share",
        type=float,
        default=0.2,
        help="csv: share of each device's rows learned from, not scored",
    )
    evaluate.add_argument("--config", type=Path, help="YAML configuration file")
    evaluate.add_argument(
        "--broker", help="HOST:PORT: replay through this broker, end to end"
    )
    evaluate.add_argument(
        "--split", choices=["validation", "test"], default="test", help="which part"
    )

    train = commands.add_parser("train", help="train and export both models")
    train.add_argument(
        "--dataset",
        choices=["ton_iot", "simulation", "skab", "nab", "mqttset"],
        help="labeled dataset (supervised: ton_iot); with --self-supervised, "
        "simulation, ton_iot (its normal train rows), or skab, nab, mqttset "
        "(the part each one's evaluation protocol lets a detector learn from)",
    )
    train.add_argument(
        "--data",
        type=Path,
        help="the dataset's folder; with --self-supervised and no --dataset, "
        "a JSON-lines recording of normal traffic (file or folder)",
    )
    train.add_argument(
        "--out",
        type=Path,
        help="output folder (default: models; required "
        "with --self-supervised, so the shipped models are not replaced)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--leave-out",
        action="append",
        default=[],
        metavar="TYPE",
        help="supervised ton_iot: drop this attack type from train and "
        "validation (repeatable), to measure recall on an unseen type",
    )
    train.add_argument(
        "--self-supervised",
        action="store_true",
        help="learn from normal traffic with injected faults; no labels needed",
    )
    train.add_argument(
        "--from-recording",
        type=Path,
        metavar="FILE",
        help="self-supervised training on a recording made with `record` "
        "(the same as --self-supervised --data FILE)",
    )

    broker = commands.add_parser(
        "broker", help="an embedded MQTT broker with the sidecar running inside"
    )
    broker.add_argument("--config", type=Path, help="YAML configuration file")
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on")
    broker.add_argument("--port", type=int, default=1883, help="TCP port")

    record = commands.add_parser(
        "record", help="capture live traffic to JSON lines, for training"
    )
    record.add_argument("--config", type=Path, help="YAML configuration file")
    record.add_argument("--out", type=Path, required=True, help="JSON-lines file")
    record.add_argument(
        "--max-mb", type=float, default=100.0, help="stop at this size (default 100)"
    )
    record.add_argument("--duration", type=float, help="stop after this many seconds")

    bench = commands.add_parser(
        "bench", help="throughput, latency and memory against a bare subscriber"
    )
    where = bench.add_mutually_exclusive_group(required=True)
    where.add_argument("--broker", help="HOST:PORT of the broker to measure against")
    where.add_argument(
        "--start-mosquitto",
        action="store_true",
        help="start a private Mosquitto on a free loopback port, stop it after",
    )
    bench.add_argument("--json", type=Path, help="write the full report here")
    bench.add_argument("--config", type=Path, help="the sidecar's YAML config")
    bench.add_argument("--runs", type=int, help="runs per figure (default 3)")
    bench.add_argument("--seconds", type=float, help="load per run (default 3)")
    bench.add_argument("--qos", type=int, choices=[0, 1], default=0)
    bench.add_argument("--workers", type=int, help="load processes (default 2)")
    bench.add_argument("--devices", type=int, help="devices (default 200)")
    bench.add_argument("--scale", help="fleet sizes (default 100,10000,100000)")
    bench.add_argument(
        "--stages", help="subset of throughput,latency,scale,memory,profile"
    )
    return parser


def _settings(path: Path | None) -> Settings:
    settings = load_settings(path)
    configure_logging(settings.logging.level, settings.logging.format)
    return settings


def _run(args: argparse.Namespace) -> int:
    from sidecar.service import Service

    # Blocked before the threads this command starts (paho's, the worker,
    # onnxruntime's), so they inherit the mask and SIGTERM/SIGINT wait for
    # sigwait below instead of interrupting whatever runs: no
    # KeyboardInterrupt traceback, and a signal during start-up still ends
    # in a clean stop. Threads started at import are caught by a handler.
    caught = _catch_stray_signals(HELD_SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        settings = _settings(args.config)
        check_model_files(settings, str(args.config or "<defaults>"))
        models = load_cascade(
            settings.models, settings.detection, settings.window.length
        )
        service = Service(settings, models)
        service.start()
        try:
            _serve(service, args.config, caught)
        finally:
            service.stop()
    finally:
        _unblock_stop_signals()
    return EXIT_OK


def _catch_stray_signals(signals: set[signal.Signals]) -> collections.deque[int]:
    """Catch signals delivered to threads that do not block them; return them.

    Threads started while modules were imported (numpy's BLAS pool, for
    one) existed before `run` blocked its signals, so a signal may be
    delivered to one of them whenever the main thread is not waiting in
    sigtimedwait, as during a reload. At the default action that ended the
    process. A handler instead notes the signal for the main thread's loop.
    """
    caught: collections.deque[int] = collections.deque()
    for signum in signals:
        signal.signal(signum, lambda number, _frame: caught.append(number))
    return caught


def _next_signal(
    signals: set[signal.Signals], caught: collections.deque[int], timeout: float
) -> int | None:
    """The next of `signals` sent to the process, waiting at most `timeout` s."""
    if caught:
        return caught.popleft()
    info = signal.sigtimedwait(signals, timeout)
    if info is not None:
        return info.si_signo
    return caught.popleft() if caught else None


def _serve(
    service: Service, config: Path | None, caught: collections.deque[int]
) -> None:
    """Wait for a stop signal; meanwhile reload on SIGHUP or when files change.

    The config file and the model files are polled (their size and mtime)
    rather than watched with inotify: polling also sees edits through Docker
    bind mounts and network filesystems, and a few stat calls every couple of
    seconds cost nothing. A change is applied once the files stopped changing
    for one poll, so a model half-way through being written is not loaded.
    """
    config_files = [config] if config is not None else []
    config_watch = _FileWatch(config_files)
    model_watch = _FileWatch(_model_files(service.settings))
    next_poll = time.monotonic() + RELOAD_POLL_S
    while True:
        signum = _next_signal(HELD_SIGNALS, caught, SIGNAL_POLL_S)
        if signum in STOP_SIGNALS:
            _LOG.info("stopping signal=%s", signal.Signals(signum).name)
            return
        hangup = signum is not None
        if not hangup and time.monotonic() < next_poll:
            continue
        next_poll = time.monotonic() + RELOAD_POLL_S
        if hangup:
            _LOG.info("reloading signal=SIGHUP")
        if (hangup or config_watch.settled_change()) and config is not None:
            _reload_config(service, config)
        # SIGHUP reloads the models only when their files changed since they
        # were loaded: swapping in the same pair again would reset every
        # device's score calibration for nothing.
        if model_watch.settled_change() or (hangup and model_watch.changed()):
            _reload_models(service)
            model_watch = _FileWatch(_model_files(service.settings))


class _FileWatch:
    """Report a change of some files once they have stopped changing."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._applied = self._stamp()
        self._last = self._applied

    def _stamp(self) -> tuple[tuple[float, int], ...]:
        stamps = []
        for path in self._paths:
            try:
                status = path.stat()
            except OSError:
                stamps.append((-1.0, -1))
            else:
                stamps.append((status.st_mtime, status.st_size))
        return tuple(stamps)

    def changed(self) -> bool:
        """Whether the files differ from when they were last applied."""
        return self._stamp() != self._applied

    def settled_change(self) -> bool:
        stamp = self._stamp()
        settled = stamp == self._last and stamp != self._applied
        self._last = stamp
        if settled:
            self._applied = stamp
        return settled


def _model_files(settings: Settings) -> list[Path]:
    from sidecar.detector import card_path

    models = settings.models
    files = [models.directory / models.rf, models.directory / models.cnn]
    return files + [card_path(path) for path in files]


def _reload_config(service: Service, path: Path) -> None:
    try:
        settings = load_settings(path)
    except ConfigError as err:
        _LOG.error("config not reloaded, the running one is kept: %s", err)
        return
    running = service.settings.logging
    if settings.logging.format != running.format:
        configure_logging(settings.logging.level, settings.logging.format)
    service.reload(settings)


def _reload_models(service: Service) -> None:
    settings = service.settings
    try:
        models = load_cascade(
            settings.models, settings.detection, settings.window.length
        )
    except SidecarError as err:
        _LOG.error("models not reloaded, the running ones are kept: %s", err)
        return
    service.swap_models(models)
    _LOG.info("models reloaded versions=%s", models.versions)


def _unblock_stop_signals() -> None:
    """Unblock the stop signals, first swallowing any that arrived meanwhile.

    A second SIGTERM or SIGINT sent while the service was stopping would
    otherwise be delivered on unblocking and kill the process (or raise
    KeyboardInterrupt) just as it exits cleanly.
    """
    while HELD_SIGNALS & signal.sigpending():
        signum = signal.sigwait(HELD_SIGNALS)
        _LOG.info(
            "signal ignored while stopping signal=%s", signal.Signals(signum).name
        )
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)


def _evaluate(args: argparse.Namespace) -> int:
    from converters.cli import DATA_FOLDERS, evaluate_command

    if args.data is None and args.dataset in DATA_FOLDERS:
        args.data = DEFAULT_DATA / DATA_FOLDERS[args.dataset]
    return evaluate_command(args, _settings(args.config), sys.stdout)


def _demo(args: argparse.Namespace) -> int:
    from converters.demo import run_demo

    settings = _settings(None)
    return run_demo(settings, args.data, args.rate, sys.stdout)


def _train(args: argparse.Namespace) -> int:
    if args.from_recording is not None:
        if args.dataset is not None or args.data is not None:
            sys.stderr.write(
                "anomaly-sidecar train: --from-recording reads its own file; "
                "leave out --dataset and --data\n"
            )
            return EXIT_CONFIG
        args.self_supervised = True
        args.data = args.from_recording
    if args.self_supervised:
        return _train_self_supervised(args)
    if args.dataset != "ton_iot" or args.data is None:
        sys.stderr.write(
            "anomaly-sidecar train: supervised training needs --dataset ton_iot "
            "and --data (or add --self-supervised)\n"
        )
        return EXIT_CONFIG
    from converters.train import train_command

    _settings(None)
    return train_command(
        args.data, args.out or Path("models"), args.seed, args.leave_out
    )


def _train_self_supervised(args: argparse.Namespace) -> int:
    from converters.cli import DATA_FOLDERS
    from converters.selfsup import PROTOCOL_DATASETS, selfsup_command

    if args.out is None or (args.dataset is None and args.data is None):
        sys.stderr.write(
            "anomaly-sidecar train --self-supervised: needs --out and either "
            "--data RECORDING or --dataset simulation|ton_iot|skab|nab|mqttset\n"
        )
        return EXIT_CONFIG
    if args.data is None and args.dataset in PROTOCOL_DATASETS:
        args.data = DEFAULT_DATA / DATA_FOLDERS[args.dataset]
    _settings(None)
    try:
        return selfsup_command(args.dataset, args.data, args.out, args.seed)
    except (FileNotFoundError, ValueError) as err:
        sys.stderr.write(f"anomaly-sidecar train: {err}\n")
        return EXIT_CONFIG


def _broker(args: argparse.Namespace) -> int:
    from sidecar.broker import EmbeddedBroker

    caught = _catch_stray_signals(STOP_SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # Validated here first, so a config error reads as one, with exit 2.
        check_model_files(_settings(args.config), str(args.config or "<defaults>"))
        options = {"config_file": str(args.config) if args.config else None}
        plugins = {"sidecar.plugin.SidecarPlugin": options}
        with EmbeddedBroker(args.host, args.port, plugins=plugins):
            _LOG.info(
                "broker with sidecar listening host=%s port=%d", args.host, args.port
            )
            signum = None
            while signum not in STOP_SIGNALS:
                signum = _next_signal(STOP_SIGNALS, caught, SIGNAL_POLL_S)
            _LOG.info("stopping signal=%s", signal.Signals(signum).name)
    finally:
        _unblock_stop_signals()
    return EXIT_OK


def _record(args: argparse.Namespace) -> int:
    import threading

    from sidecar.record import record

    settings = _settings(args.config)
    stop = threading.Event()
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: stop.set())
    try:
        summary = record(
            settings,
            args.out,
            max_bytes=int(args.max_mb * BYTES_PER_MB),
            duration_s=args.duration,
            stop=stop,
            progress=sys.stderr,
        )
    except TimeoutError as err:
        sys.stderr.write(f"anomaly-sidecar record: {err}\n")
        return EXIT_FAILURE
    sys.stdout.write(
        f"{summary.written} messages, {summary.bytes_written} bytes in {args.out} "
        f"({summary.reason}; {summary.dropped} dropped)\n"
    )
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from converters.bench import bench_command

    return bench_command(args, _settings(args.config), sys.stdout)


_COMMANDS = {
    "run": _run,
    "evaluate": _evaluate,
    "demo": _demo,
    "train": _train,
    "bench": _bench,
    "record": _record,
    "broker": _broker,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run one command; return the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as err:
        # A user error: the message lists every problem; no traceback.
        sys.stderr.write(f"anomaly-sidecar: {err}\n")
        return EXIT_CONFIG
    except SidecarError as err:
        sys.stderr.write(f"anomaly-sidecar: {err}\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
