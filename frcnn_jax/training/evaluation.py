"""Evaluating a model during and after training, and a saved checkpoint (`python -m
frcnn_jax.evaluate`): detection over every device and host, then `frcnn_jax.evaluation`."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax import checkpointing, rundir, sharding
from frcnn_jax.data import make_batches, sources
from frcnn_jax.errors import MissingFile
from frcnn_jax.evaluation.runner import evaluate_detections
from frcnn_jax.models import FasterRCNN, build_model, roi_heads
from frcnn_jax.training.initial import initial_variables


def make_detect_fn(model, mesh, *, proposals=False):
    """(variables, host batch) -> (Detections, proposals or None) as NumPy, all hosts' images."""
    replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    @functools.partial(jax.jit, in_shardings=(replicated, batched, batched, batched))
    def detect(variables, images, sizes, scales):
        return model.apply(
            variables, images, sizes, scales, return_proposals=True, method=FasterRCNN.detect
        )

    def detect_fn(variables, batch):
        local = (batch.local or batch).inputs  # multi-host: each host feeds its own examples
        inputs = sharding.shard_batch((local.image, local.image_size, local.scale), mesh)
        out = detect(variables, *inputs)
        detections, boxes = jax.tree.map(np.asarray, sharding.gather(out))
        return detections, (boxes if proposals else None)

    return detect_fn


def evaluate(config, model, variables, mesh, *, workdir=None, step=None, split=None):
    """Evaluate on `split` (default `config.eval.split`); every host takes part, process 0
    writes the report. With `config.eval.scales`, each image is detected at every scale (its
    short side resized to each) and the detections merged (`roi_heads.merge_detections`):
    the paper's image-pyramid testing; proposal recall then counts the first scale's."""
    split = split or config.eval.split
    data = sources.with_name(config.data, eval_data_name(config))
    scales = tuple(config.eval.get("scales") or ())
    loaders = []  # closed at the end, which stops their workers and frees their shared memory
    try:
        for scale_data in [sources.at_scale(data, s) for s in scales] or [data]:
            loaders.append(_loader(scale_data, split, config, mesh))
        (first, info), *others = loaders
        sources.check_class_count(model.num_classes, info, data)
        detect_fn = make_detect_fn(model, mesh, proposals=config.eval.proposal_recall)
        if others:
            streams = [iter(_gathered(loader)) for loader, _ in others]
            detect_fn = _pyramid(detect_fn, streams, model.head)
        write = workdir is not None and jax.process_index() == 0
        return evaluate_detections(
            lambda batch: detect_fn(variables, batch),
            _gathered(first),
            info,
            use_07_metric=config.eval.metric == "voc07",
            iou_threshold=config.eval.iou_threshold,
            coco=config.eval.coco,
            proposals=config.eval.proposal_recall,
            workdir=workdir if write else None,
            title=f"{data.name} {split}, step {step}",
        )
    finally:
        for loader, _ in loaders:
            loader.close()


def _loader(data, split, config, mesh):
    """(`Batches`, `DatasetInfo`): this host's share of `split`, one pass."""
    return make_batches(
        data,
        split,
        batch_size=sharding.local_batch_size(
            config.eval.batch_size, mesh, "config.eval.batch_size"
        ),
        train=False,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        agree=sharding.hosts_agree(),
    )


def _gathered(loader):
    """`loader`'s batches, each with every host's examples when there are several hosts."""
    if jax.process_count() > 1:
        return (sharding.gather_batch(b) for b in loader)
    return loader


def _pyramid(detect_fn, others, head):
    """`detect_fn` over the first scale's batch and the same images at the other scales (the
    `others` iterators, in step with the first), detections merged per image."""
    merge = jax.jit(
        jax.vmap(
            lambda *found: roi_heads.merge_detections(
                found, nms_threshold=head.nms_threshold, max_detections=head.max_detections
            )
        )
    )

    def pyramid_fn(variables, batch):
        detections, proposals = detect_fn(variables, batch)
        found = [detections]
        for stream in others:
            other = next(stream)
            if not np.array_equal(other.image_id, batch.image_id):
                raise RuntimeError("eval.scales: the scales' batches went out of step")
            found.append(detect_fn(variables, other)[0])
        return jax.tree.map(np.asarray, merge(*found)), proposals

    return pyramid_fn


def eval_data_name(config):
    """The dataset evaluated: `config.eval.data_name`, or `config.data.name` when unset."""
    return config.eval.get("data_name") or config.data.name


def evaluate_checkpoint(config, workdir, step=None, *, allow_model_change=False):
    """Evaluate the checkpoint at `step` (latest if None) of `workdir` on `config.eval.split`;
    the report goes to `<workdir>/eval/step_<step>/`. A workdir without checkpoints evaluates
    `config.model.init_checkpoint` (an imported detector) as step 0. A model that differs from
    the run's (`rundir.check_model`) is an error unless `allow_model_change`."""
    rundir.check_model(workdir, config, allow_change=allow_model_change)
    checkpoints = checkpointing.Checkpoints(workdir)
    step = checkpoints.latest_step() if step is None else step
    model = build_model(config)
    mesh = sharding.data_mesh()
    if step is None and config.model.get("init_checkpoint"):
        step, variables = 0, initial_variables(config, model)
    elif step is None:
        raise MissingFile(
            f"no checkpoints in {checkpoints.directory}: train first, or set "
            "config.model.init_checkpoint to evaluate imported weights"
        )
    else:
        checkpoints.check_tensors(step, _abstract_variables(config, model))
        variables = checkpoints.restore_variables(step)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    report = pathlib.Path(workdir) / "eval" / f"step_{step}"
    result = evaluate(config, model, variables, mesh, workdir=report, step=step)
    print_result(config, result, report)
    return result


def print_result(config, result, report):
    mean_ap = result["voc"]["mAP"]
    print(
        f"{eval_data_name(config)} {config.eval.split}: mAP@{config.eval.iou_threshold:g} = "
        f"{'n/a' if mean_ap is None else f'{mean_ap:.4f}'} (report: {report})",
        flush=True,
    )


def _abstract_variables(config, model):
    """Shapes of `model`'s variables (nothing computed)."""
    height, width = config.data.canvas
    return jax.eval_shape(
        functools.partial(model.init, method=FasterRCNN.detect),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, 2), jnp.int32),
    )
