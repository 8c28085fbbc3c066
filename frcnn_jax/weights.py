"""Pretrained weights: torchvision state dicts -> frcnn_jax variables, and strict loading.

`from_torchvision(state_dict, arch=...)` returns the part of the variables that
`build_model(config)` makes (`{"params": ..., "batch_stats": ...}`) which the state dict
provides, flat ('/'-joined paths such as `params/backbone/conv1_1/kernel`), with the path
prefixes it covers completely; `save` / `load` write and read that as an `.npz`;
`restore_into` puts it into a model's variables, strictly.

Every layout change between torchvision and frcnn_jax is made here, once:
- Convolutions: torch OIHW -> flax HWIO. Linear layers: torch [out, in] -> Dense [in, out].
- fc6 after RoI pooling: torchvision flattens pooled maps [R, C, S, S] in (c, h, w) order;
  frcnn_jax pools NHWC and flattens (h, w, c). fc6's input rows are permuted accordingly,
  so a file of the right shapes but the wrong order cannot load (VGG-16's classifier.0 and
  the FPN detector's fc6).
- BatchNorm (ImageNet ResNets' BatchNorm2d, the detectors' FrozenBatchNorm2d): weight, bias,
  running_mean, running_var -> the `batch_stats` collection's weight, bias, mean, var
  (frozen: never trained); num_batches_tracked is dropped.
- RPN head: torchvision's sigmoid objectness has k channels per location (anchor a = channel
  a) and k * 4 delta channels (anchor a, coordinate j = channel 4a + j), flattened
  location-major: the order of frcnn_jax's `RPNHead` with `objectness="sigmoid"`, so only the
  kernels' layout changes. (The paper's 2k-way softmax head has no torchvision counterpart.)
- Box predictor: torchvision's deltas are class-major (class k at outputs 4k..4k+3), as
  frcnn_jax's. COCO's head has 91 outputs: background + category ids 1..90, 10 of them unused;
  `coco80=True` keeps background and the 80 used ids in order, which are TFDS `coco/2017`'s
  80 contiguous labels (label l is `COCO_CATEGORY_IDS[l]`).

Pixel conventions follow the weights (`config.model.pixel_mean`, `pixel_std`,
`channel_order`): torchvision's ImageNet models take RGB with mean (0.485, 0.456, 0.406) and
std (0.229, 0.224, 0.225) of 0-1 pixels, frcnn_jax's defaults (`IMAGENET_MEAN` / `IMAGENET_STD`
in 0-255 units). The original Caffe VGG-16 / ZF models of the paper take BGR with the means
(102.98, 115.95, 122.77) subtracted and std 1: `channel_order="bgr"`, `pixel_std=(1, 1, 1)`
for users who convert those themselves.
"""

import logging
import pathlib

import flax
import numpy as np

from frcnn_jax import npz
from frcnn_jax.errors import ConfigError, DamagedFile, MissingFile

log = logging.getLogger(__name__)

ARCHS = ("vgg16", "resnet50", "resnet101", "fasterrcnn_resnet50_fpn", "fasterrcnn_tiny_fpn")
# The 80 COCO category ids in use, in order: TFDS coco/2017's contiguous labels 0..79.
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip
_VGG16_FEATURES = {  # torchvision vgg16().features index -> frcnn_jax layer
    0: "conv1_1", 2: "conv1_2", 5: "conv2_1", 7: "conv2_2", 10: "conv3_1", 12: "conv3_2",
    14: "conv3_3", 17: "conv4_1", 19: "conv4_2", 21: "conv4_3", 24: "conv5_1", 26: "conv5_2",
    28: "conv5_3",
}  # fmt: skip
_RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
PREDICTOR = ("params/predictor/cls_score", "params/predictor/bbox_pred")


class _Reader:
    """Takes tensors from a state dict by name, remembering which were used."""

    def __init__(self, state_dict):
        self.state = {k: np.asarray(_numpy(v)) for k, v in state_dict.items()}
        self.used = set()
        self.rows = []  # (torch name, torch shape, our path, our shape) for the report

    def take(self, name):
        if name not in self.state:
            raise KeyError(f"the state dict has no tensor {name!r}")
        self.used.add(name)
        return self.state[name]

    def put(self, out, path, name, value):
        out[path] = np.ascontiguousarray(value, np.float32)
        self.rows.append((name, self.state[name].shape, path, value.shape))

    def conv(self, out, path, name, bias=True):
        kernel = self.take(f"{name}.weight").transpose(2, 3, 1, 0)  # OIHW -> HWIO
        self.put(out, f"{path}/kernel", f"{name}.weight", kernel)
        if bias:
            self.put(out, f"{path}/bias", f"{name}.bias", self.take(f"{name}.bias"))

    def linear(self, out, path, name, rows=None, channels_first=None):
        """A Linear layer; `rows` selects output rows (COCO 80 classes); `channels_first`
        (C, S) permutes fc6's inputs from (c, h, w) to (h, w, c) order."""
        weight, bias = self.take(f"{name}.weight"), self.take(f"{name}.bias")
        if rows is not None:
            weight, bias = weight[rows], bias[rows]
        if channels_first is not None:
            channels, size = channels_first
            weight = weight.reshape(-1, channels, size, size).transpose(0, 2, 3, 1)
            weight = weight.reshape(weight.shape[0], -1)
        self.put(out, f"{path}/kernel", f"{name}.weight", weight.T)
        self.put(out, f"{path}/bias", f"{name}.bias", bias)

    def batch_norm(self, out, path, name):
        for ours, theirs in (
            ("weight", "weight"),
            ("bias", "bias"),
            ("mean", "running_mean"),
            ("var", "running_var"),
        ):
            self.put(out, f"{path}/{ours}", f"{name}.{theirs}", self.take(f"{name}.{theirs}"))
        if f"{name}.num_batches_tracked" in self.state:
            self.used.add(f"{name}.num_batches_tracked")


def _numpy(value):
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def _resnet(reader, out, prefix, depth_name, stages, *, params, stats, stem=True):
    """ResNet stem (if `stem`) and the stages `stages` (0-3 = layer1-4) under `params` /
    `stats` paths, where stage i goes to `<path>/layer{i+1}` with blocks `block{j}`."""
    if stem:
        reader.conv(out, f"{params}/conv1", f"{prefix}conv1", bias=False)
        reader.batch_norm(out, f"{stats}/bn1", f"{prefix}bn1")
    for stage in stages:
        for block in range(_RESNET_DEPTHS[depth_name][stage]):
            ours, theirs = f"layer{stage + 1}/block{block}", f"{prefix}layer{stage + 1}.{block}"
            for i in (1, 2, 3):
                reader.conv(out, f"{params}/{ours}/conv{i}", f"{theirs}.conv{i}", bias=False)
                reader.batch_norm(out, f"{stats}/{ours}/bn{i}", f"{theirs}.bn{i}")
            if block == 0:
                reader.conv(
                    out, f"{params}/{ours}/downsample_conv", f"{theirs}.downsample.0", bias=False
                )
                reader.batch_norm(out, f"{stats}/{ours}/downsample_bn", f"{theirs}.downsample.1")


def _fpn_detector(reader, out, *, levels, channels, coco80):
    """torchvision's FeaturePyramidNetwork, RPNHead, TwoMLPHead and FastRCNNPredictor."""
    for level in range(levels):
        reader.conv(
            out, f"params/backbone/fpn_inner{level}", f"backbone.fpn.inner_blocks.{level}.0"
        )
        reader.conv(
            out, f"params/backbone/fpn_layer{level}", f"backbone.fpn.layer_blocks.{level}.0"
        )
    reader.conv(out, "params/rpn_head/conv", "rpn.head.conv.0.0")
    reader.conv(out, "params/rpn_head/cls", "rpn.head.cls_logits")
    reader.conv(out, "params/rpn_head/bbox", "rpn.head.bbox_pred")
    reader.linear(
        out, "params/box_head/fc6", "roi_heads.box_head.fc6", channels_first=(channels, 7)
    )
    reader.linear(out, "params/box_head/fc7", "roi_heads.box_head.fc7")
    rows = None
    if coco80:
        classes = np.array((0, *COCO_CATEGORY_IDS))
        rows = classes, (classes[:, None] * 4 + np.arange(4)).reshape(-1)
    for name, selected in zip(PREDICTOR, (None, None) if rows is None else rows, strict=True):
        reader.linear(out, name, f"roi_heads.box_predictor.{name.rsplit('/', 1)[1]}", rows=selected)


def from_torchvision(state_dict, *, arch, body="c4", coco80=False, report=None):
    """frcnn_jax variables from a torchvision state dict.

    Args:
      state_dict: name -> tensor (torch or NumPy), e.g. `torchvision.models.vgg16().state_dict()`.
      arch: "vgg16" (ImageNet VGG-16: features -> backbone conv1_1..conv5_3, classifier.0/3 ->
        box_head fc6/fc7), "resnet50" / "resnet101" (ImageNet classification ResNets -> the C4
        or FPN body, see `body`), "fasterrcnn_resnet50_fpn" (the whole detector: backbone,
        FPN, RPN head, box head, predictor), or "fasterrcnn_tiny_fpn" (torchvision's
        `FasterRCNN` around the tiny FPN, `backbone.body.{down,conv}.<stage>` then a
        `FeaturePyramidNetwork` on stages 2-4: the layout of experiments/time_to_map.py's twin).
      body: for ResNets, "c4" (stem + layer1-3 as the backbone, layer4 as the res5 box head:
        `resnet50_c4`) or "fpn" (stem + layer1-4 as the FPN's body: `resnet50_fpn`).
      coco80: for the detector, keep only background and the 80 used COCO categories of the
        91-way predictor (for `model.num_classes=80`, TFDS `coco/2017` labels).
      report: optional list that receives (torch name, torch shape, path, shape) rows.

    Returns:
      (flat, covers): `flat` maps '/'-joined variable paths ('params/backbone/conv1_1/kernel',
      'batch_stats/...') to float32 arrays; `covers` lists the path prefixes the weights
      provide completely (loading requires every model tensor under them).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    reader, out = _Reader(state_dict), {}
    if arch == "vgg16":
        for index, name in _VGG16_FEATURES.items():
            reader.conv(out, f"params/backbone/{name}", f"features.{index}")
        reader.linear(out, "params/box_head/fc6", "classifier.0", channels_first=(512, 7))
        reader.linear(out, "params/box_head/fc7", "classifier.3")
        reader.used.update(k for k in reader.state if k.startswith("classifier.6."))  # 1000-way
        covers = ["params/backbone", "params/box_head"]
    elif arch in _RESNET_DEPTHS:
        if body not in ("c4", "fpn"):
            raise ValueError(f"body must be 'c4' or 'fpn' for {arch}, got {body!r}")
        if body == "c4":
            _resnet(
                reader,
                out,
                "",
                arch,
                (0, 1, 2),
                params="params/backbone",
                stats="batch_stats/backbone",
            )
            _resnet(
                reader,
                out,
                "",
                arch,
                (3,),
                params="params/box_head",
                stats="batch_stats/box_head",
                stem=False,
            )
            covers = [
                "params/backbone",
                "batch_stats/backbone",
                "params/box_head",
                "batch_stats/box_head",
            ]
        else:
            _resnet(
                reader,
                out,
                "",
                arch,
                (0, 1, 2, 3),
                params="params/backbone/body",
                stats="batch_stats/backbone/body",
            )
            covers = ["params/backbone/body", "batch_stats/backbone/body"]
        reader.used.update(k for k in reader.state if k.startswith("fc."))  # ImageNet classifier
    elif arch == "fasterrcnn_tiny_fpn":
        for stage in range(5):
            for layer in ("down", "conv"):
                reader.conv(
                    out, f"params/backbone/body/{layer}{stage}", f"backbone.body.{layer}.{stage}"
                )
        _fpn_detector(reader, out, levels=3, channels=64, coco80=coco80)
        covers = ["params"]
    else:
        _resnet(
            reader,
            out,
            "backbone.body.",
            "resnet50",
            (0, 1, 2, 3),
            params="params/backbone/body",
            stats="batch_stats/backbone/body",
        )
        _fpn_detector(reader, out, levels=4, channels=256, coco80=coco80)
        covers = ["params", "batch_stats"]
    unused = sorted(set(reader.state) - reader.used)
    if unused:
        raise ValueError(
            f"{arch}: {len(unused)} tensors of the state dict have no place in frcnn_jax's "
            f"model, e.g. {unused[:5]} (is this a {arch} state dict?)"
        )
    if report is not None:
        report.extend(reader.rows)
    return out, covers


# ---------------------------------------------------------------- files


def save(path, flat, covers, *, backbone=None):
    """Write `from_torchvision`'s output (or a pretrained backbone's, `frcnn_jax.pretraining`)
    as an .npz (`covers` under the key '__covers__', the backbone's name under '__backbone__'
    when given) with its checksum (`frcnn_jax.npz`)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    named = {} if backbone is None else {BACKBONE_KEY: np.array(backbone)}
    npz.save(path, {"__covers__": np.array(covers), **named, **flat})


BACKBONE_KEY = "__backbone__"


def load(path, *, backbone=None):
    """(flat, covers) from an .npz written by `save`, its checksum verified (no pickles are
    read): `MissingFile` / `DamagedFile` naming the file. With `backbone` (the model's
    `config.model.backbone`), a file that names another backbone is a `ConfigError` naming
    both."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFile(f"config.model.init_checkpoint: no such file {path}")
    flat = npz.load(path, "config.model.init_checkpoint")
    stored = flat.pop(BACKBONE_KEY, None)
    if backbone is not None and stored is not None and str(stored) != backbone:
        raise ConfigError(
            f"config.model.init_checkpoint {path} holds a {str(stored)!r} backbone but "
            f"config.model.backbone is {backbone!r}: pretrain that backbone "
            "(python -m frcnn_jax.pretrain) or set config.model.backbone to the file's"
        )
    covers = flat.pop("__covers__", None)
    if covers is None:
        raise DamagedFile(
            f"config.model.init_checkpoint {path}: not a frcnn_jax weight file (no __covers__"
            " entry); write one with `python -m frcnn_jax.import_weights`"
        )
    return flat, [str(c) for c in covers]


def restore_into(variables, flat, covers, *, source="weights"):
    """`variables` (a model's initial {"params", "batch_stats", ...}) with the tensors of
    `flat` put in, strictly.

    Errors (ValueError naming the tensor and both shapes): a tensor of `flat` the model does
    not have; a shape that differs; a model tensor under a covered prefix that `flat` lacks.
    The one exception: when only the predictor's class count differs (`model.num_classes`
    against the file's), the predictor keeps its fresh initialisation and a log line lists
    the skipped tensors. Model tensors outside `covers` keep their initialisation (logged).
    """
    model = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    unknown = sorted(set(flat) - set(model))
    if unknown:
        raise ValueError(
            f"{source}: tensors not in the model: {unknown[:5]}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
    skipped = []
    for key, value in flat.items():
        want = tuple(model[key].shape)
        if tuple(value.shape) == want:
            continue
        if key.startswith(PREDICTOR) and _class_count_differs(flat, model):
            skipped.append(f"{key} {tuple(value.shape)} -> {want}")
            continue
        raise ValueError(
            f"{source}: {key} has shape {tuple(value.shape)} in the file, the model expects {want}"
        )
    covered = [k for k in model if any(k == c or k.startswith(c + "/") for c in covers)]
    missing = sorted(k for k in covered if k not in flat)
    if missing:
        raise ValueError(
            f"{source}: the file covers {covers} but lacks {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + f" (model shape of the first: {tuple(model[missing[0]].shape)})"
        )
    if skipped:
        log.warning(
            "%s: the file's class count differs from model.num_classes; re-initialised the "
            "predictor instead of loading: %s",
            source,
            ", ".join(skipped),
        )
    fresh = sorted({k.rsplit("/", 1)[0] for k in model if k not in flat})
    if fresh:
        log.info(
            "%s: %d tensors loaded; initialised fresh: %s",
            source,
            len(flat) - len(skipped),
            ", ".join(fresh[:12]) + (" ..." if len(fresh) > 12 else ""),
        )
    out = dict(model)
    for key, value in flat.items():
        if tuple(value.shape) == tuple(model[key].shape):
            out[key] = np.asarray(value, model[key].dtype)
    return flax.traverse_util.unflatten_dict(out, sep="/")


def _class_count_differs(flat, model):
    key = "params/predictor/cls_score/kernel"
    return (
        key in flat
        and flat[key].shape[0] == model[key].shape[0]
        and (flat[key].shape[1] != model[key].shape[1])
    )
