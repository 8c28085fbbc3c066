"""Orbax checkpoints of the train state together with the data loader's position.

Layout: `<workdir>/checkpoints/<step>/{state, loader, meta}`. `state` holds the arrays (step,
params, frozen statistics, optimizer state), `loader` the grain loader state (JSON) so a resumed
run sees exactly the examples an uninterrupted one would, `meta` the seed and config summary.
Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact.
"""

import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, workdir, *, max_to_keep=3):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "loader", "meta"),
        )

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step, state, loader_state, meta):
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                loader=ocp.args.JsonSave(loader_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def _check_step(self, step):
        if step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} "
                f"(available: {self.all_steps() or 'none'})"
            )

    def restore(self, step, abstract_state):
        """(state, loader_state, meta) at `step`; `abstract_state` gives shapes and shardings."""
        self._check_step(step)
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                loader=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.loader, restored.meta

    def restore_arrays(self, step):
        """Only the saved state, as a dict of arrays in the saved structure (for evaluation)."""
        self._check_step(step)
        restored = self.manager.restore(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
        return restored.state

    def restore_variables(self, step):
        """The model's variables at `step` ({"params", ...frozen collections}, what
        `model.apply` takes), on the first device: the optimizer state is not read."""
        self._check_step(step)
        saved = ocp.StandardCheckpointer().metadata(self.directory / str(int(step)) / "state")
        tree = getattr(saved, "item_metadata", saved)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = {
            key: jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree[key]
            )
            for key in ("params", "frozen")
        }
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract, partial_restore=True)
            ),
        )
        return {"params": restored.state["params"], **restored.state["frozen"]}

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
