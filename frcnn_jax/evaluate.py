"""python -m frcnn_jax.evaluate --config configs/<name>.py --workdir DIR [--checkpoint STEP]

Evaluates a checkpoint of DIR (the latest unless --checkpoint) on `config.eval.split` and
writes DIR/eval/step_<STEP>/: metrics.json, table.md (mAP and per-class AP), pr/<class>.png,
recall.png (with --config.eval.proposal_recall=True), detections_coco.json.
"""

from frcnn_jax.runtime import configure_runtime

configure_runtime()

from absl import app, flags  # noqa: E402

from frcnn_jax import cli, trainer  # noqa: E402
from frcnn_jax.config import check_config  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_and_workdir("The training run's directory.")
flags.DEFINE_integer("checkpoint", None, "Step to evaluate (default: the latest).")


def main(argv):
    del argv
    cli.setup_logging()
    check_config(FLAGS.config)
    trainer.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)


if __name__ == "__main__":
    app.run(main)
