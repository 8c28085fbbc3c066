"""python -m frcnn_jax.evaluate --config configs/<name>.py --workdir DIR [--checkpoint STEP]

Evaluates a checkpoint of DIR (the latest unless --checkpoint) on `config.eval.split` and
writes DIR/eval/step_<STEP>/: metrics.json, table.md (mAP and per-class AP), pr/<class>.png,
recall.png (with --config.eval.proposal_recall=True), detections_coco.json.
"""

from frcnn_jax.runtime import configure_xla_cpu

configure_xla_cpu()

import logging  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from frcnn_jax import trainer  # noqa: E402
from frcnn_jax.config import check_config  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_integer("checkpoint", None, "Step to evaluate (default: the latest).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's notices
    check_config(FLAGS.config)
    trainer.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)


if __name__ == "__main__":
    app.run(main)
