"""What a run reports: scalars to `<workdir>/metrics.jsonl` and TensorBoard, and progress lines
(steps/s, images/s, ETA, losses)."""

import json
import logging
import pathlib
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
                from flax.metrics import tensorboard

                self._tb = tensorboard.SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:  # TensorBoard needs TensorFlow; JSONL always works
                log.warning("TensorBoard writer unavailable; writing metrics.jsonl only")

    def write(self, step, scalars, prefix=""):
        if not self.enabled:
            return
        scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.scalar(k, v, step)
            self._tb.flush()

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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
    elapsed = time.perf_counter() - start
    rate = (step - start_step) / max(elapsed, 1e-9)
    eta = (num_steps - step) / max(rate, 1e-9)
    lr = float((lr_fn or learning_rate_schedule(train))(step))
    scalars = {**mean, "steps_per_s": rate, "learning_rate": lr, "elapsed_s": elapsed}
    writer.write(step, scalars, prefix=f"train/{name}")
    terms = " ".join(f"{k}={v:.4f}" for k, v in mean.items() if k not in ("loss", "grad_norm"))
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
