"""The base config every `configs/*.py` file starts from: `data`, `model`, `train`, `eval`.

Each field carries its paper value in a comment where the paper has one. Config files override
fields; the command line overrides anything (`--config.train.learning_rate=0.01`).
"""

import dataclasses
import types

import ml_collections

from frcnn_jax import fields, kernels
from frcnn_jax.data.config import check_data_config, data_config
from frcnn_jax.errors import ConfigError, MissingFile
from frcnn_jax.models import build_model
from frcnn_jax.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from frcnn_jax.models.roi_heads import HeadSettings
from frcnn_jax.models.rpn import RPNSettings
from frcnn_jax.overrides import override

SCHEMES = ("approximate_joint", "non_approximate_joint", "alternating")
METRICS = ("voc07", "voc_area")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("step", "cosine")
WEIGHT_DECAY_ON = ("kernels", "all")


def model_config(**overrides):
    """`config.model` with defaults (the paper's VGG-16 detector for VOC); keyword arguments
    override fields, `rpn` / `head` as dicts of their fields (an unknown field fails, naming
    it)."""
    c = ml_collections.ConfigDict()
    c.backbone = "vgg16"  # paper: VGG-16 (ZF for the fast net)
    c.num_classes = 20  # K object classes (VOC: 20)
    c.dtype = "float32"  # "bfloat16": bf16 conv/matmul, float32 parameters and box math
    # "auto": frcnn_jax's CPU convolution and pooling kernels where they apply; "xla": XLA's
    # own everywhere (see frcnn_jax.kernels)
    c.kernels = kernels.DEFAULT
    c.frozen_stages = ml_collections.FieldReference(None, field_type=int)  # None: default
    # .npz from `python -m frcnn_jax.import_weights` (ImageNet backbones or a whole detector)
    c.init_checkpoint = ml_collections.FieldReference(None, field_type=str)
    # The input convention of the weights (see frcnn_jax.weights): torchvision's ImageNet RGB
    # mean/std in 0-255 units; Caffe's VGG-16/ZF: "bgr", mean (102.98, 115.95, 122.77), std 1.
    c.pixel_mean = IMAGENET_MEAN
    c.pixel_std = IMAGENET_STD
    c.channel_order = "rgb"
    c.rpn = settings_config(RPNSettings)  # every field, paper values (see RPNSettings)
    c.head = settings_config(HeadSettings)  # every field, paper values (see HeadSettings)
    override(c, overrides, "config.model")
    return c


def base_config():
    """The paper's setting (VGG-16 on VOC 2007, its schedule) that every config file starts
    from; sections `data`, `model`, `train`, `eval`."""
    c = ml_collections.ConfigDict()
    c.data = data_config()
    c.model = model_config()

    c.train = ml_collections.ConfigDict()
    c.train.scheme = "approximate_joint"  # paper default; "non_approximate_joint", "alternating"
    # Alternating training (the paper's 4 steps, called phases 1-4 here; "step" is an optimizer
    # step), phase 2's starting weights: "initial" (the paper: the same ImageNet-initialized
    # network as phase 1) or "phase1" (phase 1's trained network; for training from scratch,
    # where "initial" would throw phase 1's backbone training away).
    c.train.alternating_phase2_init = "initial"
    # Alternating training, the four phases' lengths and each phase's lr decay step (paper /
    # py-faster-rcnn alt-opt: (80000, 40000, 80000, 40000) and (60000, 30000, 60000, 30000)).
    # Empty: num_steps split 1/3, 1/6, 1/3, 1/6, with lr_steps and warm-up scaled alike.
    c.train.alternating_phase_steps = ()
    c.train.alternating_phase_lr_steps = ()
    # ... and each phase's batch size; empty: batch_size (py-faster-rcnn: 1, 2, 1, 2 images)
    c.train.alternating_phase_batch_sizes = ()
    # 4: the paper's scheme; 2: stop after phase 2, with model.rpn.shared_features=False: phase
    # 1's RPN and phase 2's Fast R-CNN, each with its own convs (the paper's "unshared", Table 2)
    c.train.alternating_phases = 4
    c.train.batch_size = 2  # global images per step (paper: 1 image per GPU, 2 in py-faster-rcnn)
    c.train.num_steps = 40000  # paper VOC07: 60k + 20k images at 1 image/step
    c.train.learning_rate = 1e-3  # paper: 1e-3
    c.train.lr_steps = (30000,)  # paper: x0.1 after 60k images
    c.train.lr_decay = 0.1  # paper: 0.1
    c.train.warmup_steps = 0  # linear warm-up steps (not in the paper; torchvision uses 1000)
    c.train.warmup_factor = 1e-3
    # "sgd": SGD with momentum and L2 weight decay in the gradient (the paper, Caffe, torchvision's
    # detection recipes); "adamw": Adam with decoupled weight decay (Loshchilov & Hutter), both
    # with decay on kernels only, biases at bias_lr_factor, frozen layers untouched.
    c.train.optimizer = "sgd"
    c.train.momentum = 0.9  # paper: 0.9 (SGD)
    c.train.adam_b1 = 0.9  # AdamW's moment decay rates and epsilon
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    # After the warm-up: "step" (x lr_decay at each of lr_steps: the paper) or "cosine" (from
    # learning_rate down to cosine_final_factor x learning_rate at num_steps; lr_steps unused).
    c.train.lr_schedule = "step"
    c.train.cosine_final_factor = 0.0
    c.train.weight_decay = 5e-4  # paper: 5e-4 (on kernels; frozen layers excluded)
    # the parameters decayed: "kernels" (Caffe / py-faster-rcnn: biases have decay_mult 0) or
    # "all" (every trained parameter, biases included: torchvision's detection references)
    c.train.weight_decay_on = "kernels"
    c.train.bias_lr_factor = 1.0  # biases' learning rate / the rate (py-faster-rcnn: 2)
    c.train.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)  # None: off
    c.train.seed = 0
    c.train.log_every = 20
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.eval_every = 0  # steps between evaluations on eval.periodic_split; 0: only at the end
    # > 0: the training loop ends after about this many minutes (compilation, steps, loading,
    # logging, checkpoint saves, periodic evaluations): the schedule of num_steps steps is
    # stretched or shrunk to the steps that fit, re-fitted at each progress record from the
    # speed the run sustains (`training.budget.Budget`); `python -m frcnn_jax.fit_budget`
    # fits num_steps itself as a first guess. 0: exactly num_steps steps.
    c.train.budget_minutes = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"  # the final evaluation; paper: VOC 2007 test
    # the dataset evaluated (a TFDS name as data.name); None: data.name. voc0712 trains on
    # VOC 2007 + 2012 and evaluates on VOC 2007 test only.
    c.eval.data_name = ml_collections.FieldReference(None, field_type=str)
    c.eval.periodic_split = "validation"  # evaluations during training (train.eval_every)
    c.eval.batch_size = 2
    c.eval.metric = "voc07"  # paper: VOC07 11-point; "voc_area" for VOC2010+
    c.eval.iou_threshold = 0.5  # paper: 0.5
    c.eval.coco = False  # also pycocotools' 12 numbers
    c.eval.proposal_recall = False  # also recall vs IoU of the RPN's proposals (Figure 4)
    # Image-pyramid testing: short sides to detect each image at, detections merged by class NMS
    # (the paper's Table 10: 5 scales); empty: data.min_size alone.
    c.eval.scales = ()
    return c


def settings_config(cls):
    """A ConfigDict holding every field of the settings dataclass `cls` with its default (the
    dataclass is the one place the defaults are defined). Fields that may be None are typed
    `object` so that the command line can set either a number or None
    (`--config.model.rpn.allowed_border=None`); `build_model` checks their values."""
    c = ml_collections.ConfigDict()
    for field in dataclasses.fields(cls):
        optional = isinstance(field.type, types.UnionType) and type(None) in field.type.__args__
        if optional:
            c[field.name] = ml_collections.FieldReference(field.default, field_type=object)
        else:
            c[field.name] = field.default
    return c


def torchvision_heads(model):
    """Set `model.rpn` / `model.head` (a config's `model` section) to torchvision's Faster R-CNN
    settings where they differ from the paper's: sigmoid objectness, every anchor used, 2000
    proposals per level, no minimum proposal size, lambda 1 over the sampled anchors, RoIAlign,
    512 RoIs per image with backgrounds from IoU 0, the head's smooth-L1 beta 1/9, class NMS
    0.5. Counts and widths that depend on the model (channels, proposals, fc widths) stay for
    the config file to set."""
    model.rpn.update(
        objectness="sigmoid",
        allowed_border=None,
        train_pre_nms_top_n=2000,
        train_post_nms_top_n=2000,
        test_pre_nms_top_n=1000,
        test_post_nms_top_n=1000,
        min_size=1e-3,
        min_size_original=False,
        box_weight=1.0,
        box_normalizer=None,
    )
    model.head.update(
        pooler="align",
        widths=(1024, 1024),
        dropout=0.0,
        batch_size=512,
        background_iou=(0.0, 0.5),
        beta=1 / 9,
        nms_threshold=0.5,
    )


TRAIN_RULES = {
    "scheme": fields.choice(*SCHEMES),
    "alternating_phase2_init": fields.choice("initial", "phase1"),
    "alternating_phase_steps": fields.sequence(fields.count()),
    "alternating_phase_lr_steps": fields.sequence(fields.count(low=0)),
    "alternating_phase_batch_sizes": fields.sequence(fields.count()),
    "alternating_phases": fields.choice(2, 4),
    "batch_size": fields.count(),
    "num_steps": fields.count(),
    "learning_rate": fields.number(above=0),
    "lr_steps": fields.sequence(fields.count()),
    "lr_decay": fields.number(above=0),
    "warmup_steps": fields.count(low=0),
    "warmup_factor": fields.number(above=0, high=1),
    "optimizer": fields.choice(*OPTIMIZERS),
    "momentum": fields.number(low=0, below=1),
    "adam_b1": fields.number(low=0, below=1),
    "adam_b2": fields.number(low=0, below=1),
    "adam_eps": fields.number(above=0),
    "lr_schedule": fields.choice(*LR_SCHEDULES),
    "cosine_final_factor": fields.fraction(),
    "weight_decay": fields.number(low=0),
    "weight_decay_on": fields.choice(*WEIGHT_DECAY_ON),
    "bias_lr_factor": fields.number(above=0),
    "grad_clip_norm": fields.optional(fields.number(above=0)),
    "seed": fields.count(low=0),
    "log_every": fields.count(),
    "checkpoint_every": fields.count(),
    "keep_checkpoints": fields.count(),
    "eval_every": fields.count(low=0),
    "budget_minutes": fields.number(low=0),
}
EVAL_RULES = {
    "split": fields.text(),
    "data_name": fields.optional(fields.text()),
    "periodic_split": fields.text(),
    "batch_size": fields.count(),
    "metric": fields.choice(*METRICS),
    "iou_threshold": fields.number(above=0, high=1),
    "coco": fields.flag(),
    "proposal_recall": fields.flag(),
    "scales": fields.sequence(fields.count()),
}
SECTIONS = {name: fields.mapping() for name in ("data", "model", "train", "eval")}


def check_config(c):
    """Raise `ConfigError` naming the field for any value that cannot work, before anything is
    read or compiled: every field's type and range (`TRAIN_RULES`, `EVAL_RULES`,
    `frcnn_jax.data.config.RULES`, `frcnn_jax.models.MODEL_RULES` and the RPN / head settings'
    `RULES`; a field a section does not have is an error too), then the combinations (the
    model's by building it)."""
    fields.check_section(c, SECTIONS, "config")
    check_data_config(c.data)
    fields.check_section(c.train, TRAIN_RULES, "config.train")
    fields.check_section(c.eval, EVAL_RULES, "config.eval")
    model = build_model(c)
    coarsest = max(model.strides)
    if min(c.data.canvas) < coarsest:
        raise ConfigError(
            f"config.data.canvas {tuple(c.data.canvas)} is smaller than the backbone's coarsest "
            f"stride ({coarsest} pixels): its feature maps would be empty"
        )
    phases, decays = c.train.alternating_phase_steps, c.train.alternating_phase_lr_steps
    if phases and len(phases) != 4:
        raise ConfigError(
            f"config.train.alternating_phase_steps: need 4 positive step counts, got {phases}"
        )
    if decays and (not phases or len(decays) != 4):
        raise ConfigError(
            "config.train.alternating_phase_lr_steps: need 4 decay steps, one per phase, and "
            f"alternating_phase_steps set; got {decays} with phase steps {phases}"
        )
    sizes = c.train.alternating_phase_batch_sizes
    if sizes and len(sizes) != 4:
        raise ConfigError(
            f"config.train.alternating_phase_batch_sizes: need 4 positive sizes, got {sizes}"
        )
    if c.train.budget_minutes and c.train.scheme == "alternating":
        raise ConfigError(
            "config.train.budget_minutes: the alternating scheme's four phases have their own "
            "step counts (alternating_phase_steps) and are not fitted to a budget; set 0"
        )
    if c.train.scheme == "non_approximate_joint" and c.model.head.pooler != "align":
        raise ConfigError(
            "config.train.scheme='non_approximate_joint' needs config.model.head.pooler='align'"
        )
    _check_variants(c)


def _check_variants(c):
    """The paper's ablation switches: combinations that cannot work."""
    alternating = c.train.scheme == "alternating"
    shared = c.model.rpn.shared_features
    if alternating and (c.train.alternating_phases == 2) == shared:
        raise ConfigError(
            "config.train.alternating_phases=2 (stop after phase 2) goes with "
            "config.model.rpn.shared_features=False and 4 with True: phases 3 and 4 share the "
            f"features; got alternating_phases={c.train.alternating_phases}, "
            f"shared_features={shared}"
        )
    if c.model.head.rois == "anchors" and (alternating or not shared):
        raise ConfigError(
            "config.model.head.rois='anchors' (one-stage, no RPN) needs a joint scheme and "
            f"shared features; got scheme={c.train.scheme!r}, shared_features={shared}"
        )


def config_from_file(path, arg=None):
    """`get_config(arg)` of a config file (for notebooks, and for variants built on another
    config file: `config_from_file(pathlib.Path(__file__).with_name("voc07_vgg16.py"))`)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFile(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()
