"""Several trainings at once, each in a process of its own (`capstf study --jobs N`).

One CapsNet run leaves a large GPU mostly idle, so several at once get more done (measured in
docs/results.md and docs/performance.md). Processes, unlike
threads, give each training its own TensorFlow runtime, its own GPU where there are several,
and the stop signals `capstf train` checkpoints on.
"""
import dataclasses
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from capstf.errors import Preempted, RuntimeFailure

POLL_SECONDS = 0.2


@dataclasses.dataclass
class Worker:
    """A training running in a process of its own."""
    name: str
    gpu: Optional[str]
    log_path: Path
    started: float
    signals_passed: int = 0  # how many of the stop signals received it has been sent


def visible_gpus() -> List[str]:
    """What CUDA_VISIBLE_DEVICES would name, in a worker, for each GPU this process sees."""
    count = len(tf.config.list_physical_devices("GPU"))
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if len(listed) >= count else [str(i) for i in range(count)]


def least_used_gpu(gpus: Sequence[str], in_use: Sequence[Optional[str]]) -> Optional[str]:
    """The GPU the fewest running workers have (the first of equals); None without GPUs."""
    return min(gpus, key=lambda gpu: sum(used == gpu for used in in_use)) if gpus else None


def worker_environment(gpu: Optional[str]) -> Dict[str, str]:
    """This process's environment, with the worker's one GPU and TensorFlow taking GPU memory as
    it needs it: by default each process would claim a whole GPU, and a second on it fail."""
    env = {**os.environ, "TF_FORCE_GPU_ALLOW_GROWTH": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH", "true")}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def last_error(log_path: Path) -> str:
    """Why a worker failed: its `capstf: error:` line, else its last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    errors = [line[len("capstf: error: "):] for line in lines if line.startswith("capstf: error: ")]
    return (errors or lines or ["no output"])[-1][:300]


def run_in_processes(commands: Sequence[Tuple[str, List[str]]], jobs: int, log_dir: Path, log=print) -> Dict[str, str]:
    """Runs each (name, argv) of `commands`, in order, `jobs` at a time; returns {name: why} for
    those that failed. Each writes its output to log_dir/<name>.log (appended to) and gets the
    GPU that the fewest others have.

    SIGTERM and Ctrl-C are passed on to every worker, which checkpoints and stops as `capstf
    train` does; none starts after them, and once all have stopped they are raised here as for a
    single training (Preempted, KeyboardInterrupt), so that the same command resumes.
    """
    gpus = visible_gpus()
    waiting, running, failed = list(commands), {}, {}
    with PassedOnSignals() as signals:
        try:
            while waiting or running:
                while waiting and len(running) < jobs and not signals.received:
                    name, argv = waiting.pop(0)
                    gpu = least_used_gpu(gpus, [w.gpu for w in running.values()])
                    log_path = log_dir / f"{name}.log"
                    running[start(argv, gpu, log_path)] = Worker(name, gpu, log_path, time.monotonic())
                    log(f"{name}: training in a process of its own" + (f" on GPU {gpu}" if gpu else "")
                        + f"; its output goes to {log_path}")
                time.sleep(POLL_SECONDS)
                for process, worker in running.items():
                    for signum in signals.received[worker.signals_passed:]:
                        process.send_signal(signum)
                    worker.signals_passed = len(signals.received)
                for process in [p for p in running if p.poll() is not None]:
                    worker = running.pop(process)
                    if process.returncode == 0:
                        log(f"{worker.name}: done, {time.monotonic() - worker.started:.0f} s")
                    elif not signals.received:
                        failed[worker.name] = f"exit {process.returncode}: {last_error(worker.log_path)}"
                        log(f"{worker.name}: failed ({failed[worker.name]})")
        finally:  # after an error here (a worker that cannot start), no training goes on unseen
            for process in running:
                process.send_signal(signal.SIGTERM)
            for process in running:
                process.wait()
    if signal.SIGINT in signals.received:
        raise KeyboardInterrupt
    if signals.received:
        raise Preempted(f"stopped by {signal.Signals(signals.received[0]).name}; each training in progress "
                        "checkpointed its last step: rerun the same command to resume.")
    return failed


def start(argv: List[str], gpu: Optional[str], log_path: Path) -> subprocess.Popen:
    """Starts a worker with its output appended to log_path, in a session of its own: a
    terminal's Ctrl-C reaches it only as passed on by `run_in_processes`, never twice."""
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=worker_environment(gpu),
                                    start_new_session=True)
    except OSError as e:
        raise RuntimeFailure(f"Cannot start a training with its output in {log_path}: {e.strerror}.") from None


class PassedOnSignals:
    """While active, SIGTERM and SIGINT are only noted (`received`: every one, in order), for
    `run_in_processes` to pass on to its workers, each of which stops on its own terms."""

    def __enter__(self):
        self.received, self.previous = [], {}
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.received.append(signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
