"""What a run reports: scalars to `<workdir>/metrics.jsonl` and TensorBoard, and progress lines
(steps/s, images/s, ETA, losses)."""

import json
import logging
import os
import pathlib
import socket
import time

import jax
import numpy as np

from frcnn_jax.training.optim import learning_rate_schedule

log = logging.getLogger("frcnn_jax.training")


class MetricWriter:
    """Scalars to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tensorboard`)."""

    def __init__(self, workdir, enabled=True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            workdir = pathlib.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (workdir / "metrics.jsonl").open("a")
            try:
                self._tb = _TensorBoardScalars(workdir / "tensorboard")
            except ImportError:  # the `tensorboard` package (the train extra); JSONL always works
                log.warning("TensorBoard writer unavailable; writing metrics.jsonl only")

    def write(self, step, scalars, prefix=""):
        if not self.enabled:
            return
        scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.write(step, scalars)

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class _TensorBoardScalars:
    """Scalars as a TensorBoard event file, written with the `tensorboard` package's protos and
    record format alone: no TensorFlow import (about 6 s at every start of a run)."""

    def __init__(self, logdir):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self._records = RecordWriter((logdir / name).open("wb"))
        self._add(self._event(file_version="brain.Event:2"))

    def _add(self, event):
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())
        self._records.flush()

    def write(self, step, scalars):
        values = [self._summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        self._add(self._event(step=int(step), summary=self._summary(value=values)))

    def close(self):
        self._records.close()


def flat_scalars(metrics, prefix=""):
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and v is not None:
            out[f"{prefix}{k}"] = v
    return out


def log_progress(step, num_steps, train, pending, start, start_step, writer, name="", lr_fn=None):
    values = jax.device_get(pending)
    mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    if "grad_norm" in mean:  # a spike between progress records shows in its largest norm
        mean["grad_norm_max"] = float(np.max([v["grad_norm"] for v in values]))
    elapsed = time.perf_counter() - start
    rate = (step - start_step) / max(elapsed, 1e-9)
    eta = (num_steps - step) / max(rate, 1e-9)
    lr = float((lr_fn or learning_rate_schedule(train))(step))
    scalars = {**mean, "steps_per_s": rate, "learning_rate": lr, "elapsed_s": elapsed}
    writer.write(step, scalars, prefix=f"train/{name}")
    terms = " ".join(f"{k}={v:.4f}" for k, v in mean.items() if not k.startswith(("loss", "grad")))
    log.info(
        "%sstep %d/%d (%.0f%%) %.2f steps/s %.1f images/s ETA %s loss=%.4f %s lr=%.2g",
        name,
        step,
        num_steps,
        100 * step / num_steps,
        rate,
        rate * train.batch_size,
        duration(eta),
        mean["loss"],
        terms,
        lr,
    )


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
