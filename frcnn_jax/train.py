"""python -m frcnn_jax.train --config configs/<name>.py --workdir DIR [--config.a.b=value ...]

Trains (resuming from DIR's latest checkpoint if there is one) and evaluates at the end.
Multi-host: pass --coordinator_address, --num_processes and --process_id, or --multihost where
`jax.distributed.initialize()` finds the cluster in the environment (TPU pods, SLURM, ...).
"""

from absl import flags

from frcnn_jax import cli

FLAGS = flags.FLAGS


def define_flags():
    cli.define_config_and_workdir("Checkpoints, metrics and reports go here.")
    flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
    flags.DEFINE_bool("multihost", False, "Multi-host with the cluster found in the environment.")
    cli.define_allow_model_change()


def main(argv):
    del argv
    cli.start()  # CPU tuning before JAX starts, logging
    import jax

    from frcnn_jax import training
    from frcnn_jax.config import check_config

    if FLAGS.coordinator_address or FLAGS.num_processes:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    elif FLAGS.multihost:  # TPU pods, SLURM, ...: JAX reads the cluster from the environment
        jax.distributed.initialize()
    check_config(FLAGS.config)
    training.train_and_evaluate(
        FLAGS.config, FLAGS.workdir, allow_model_change=FLAGS.allow_model_change
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
