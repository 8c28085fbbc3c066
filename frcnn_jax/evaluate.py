"""python -m frcnn_jax.evaluate --config configs/<name>.py --workdir DIR [--checkpoint STEP]

Evaluates a checkpoint of DIR (the latest unless --checkpoint) on `config.eval.split` and
writes DIR/eval/step_<STEP>/: metrics.json, table.md (mAP and per-class AP), pr/<class>.png,
recall.png (with --config.eval.proposal_recall=True), detections_coco.json.
"""

from absl import flags

from frcnn_jax import cli

FLAGS = flags.FLAGS


def define_flags():
    cli.define_config_and_workdir("The training run's directory.")
    flags.DEFINE_integer("checkpoint", None, "Step to evaluate (default: the latest).")
    cli.define_allow_model_change()


def main(argv):
    del argv
    cli.start()  # CPU tuning before JAX starts, logging
    from frcnn_jax import training
    from frcnn_jax.config import check_config

    check_config(FLAGS.config)
    training.evaluate_checkpoint(
        FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, allow_model_change=FLAGS.allow_model_change
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
