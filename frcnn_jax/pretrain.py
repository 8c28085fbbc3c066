"""python -m frcnn_jax.pretrain --config configs/pretrain_<name>.py --workdir DIR [--config.a.b=...]

Classification pretraining of a detector backbone (`frcnn_jax.pretraining`): trains (resuming
from DIR's latest checkpoint if there is one), reports top-1 / top-5 on the held-out split and
writes DIR/backbone.npz, which a detector config loads with
`--config.model.init_checkpoint=DIR/backbone.npz` (the same `model.backbone`, and the same
`pixel_mean` / `pixel_std` / `channel_order` as the pretraining config).
"""

from absl import flags

from frcnn_jax import cli

FLAGS = flags.FLAGS


def define_flags():
    cli.define_config_and_workdir("Checkpoints, metrics and the backbone's weights go here.")


def main(argv):
    del argv
    cli.start()  # CPU tuning before JAX starts, logging
    from frcnn_jax import pretraining

    pretraining.check_pretrain_config(FLAGS.config)
    pretraining.pretrain_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
