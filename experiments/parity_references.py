"""The reference detectors that frcnn_jax's training is compared with, step for step
(tests/models/test_training_parity.py, experiments/train_parity.py): each is a torch model, how
to read it in frcnn_jax's terms, and the frcnn_jax config it stands for.

- `coco`: torchvision's `fasterrcnn_resnet50_fpn`, whole, against `configs/coco_r50_fpn.py`.
- `paper`: the paper's VGG-16 detector (`configs/voc07_vgg16.py`), assembled from torchvision's
  parts where torchvision has them (VGG-16 features and fc6/fc7, its proposal filter, RoI
  sampling with ground truth appended, box coder, RoIPool) and from the NumPy port of
  py-faster-rcnn's anchors and anchor labelling (`tests/py_faster_rcnn.py`) where it has none
  (cross-boundary anchors removed, 2k softmax objectness, lambda 10 over N_reg 2400, the head's
  smooth-L1 sigma 1).

Both sides take every labelled candidate instead of sampling (`rpn.batch_size=None`,
`head.batch_size=None`; torchvision: sampler batch sizes above any candidate count), so that a
step is a function of the weights and the batch alone; the VGG-16 head's dropout is off for the
same reason. Everything else is the config as a user trains it, at a small image size.

The training proposals are the one discontinuous step: top-k and NMS over objectness scores,
some of which (neighbouring anchors over similar pixels) lie within float32 rounding of each
other, so each library may keep a different one of two near-tied boxes. Measured on the test
batch: 1 and 2 of ~1500 boxes per image differ, and which ones depends even on torch's thread
count or on how XLA fused the graph that computed the scores. The comparisons therefore check
the proposals on their own (all but a few near-ties the same) and compare losses and gradients
on one set of RoIs: frcnn_jax's proposals, given to the reference's head
(`losses(..., proposals)`) and to frcnn_jax's `head_losses`.
"""

import dataclasses
import functools
import os
import sys
from collections.abc import Callable

import jax
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FasterRCNN as TorchFasterRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

from frcnn_jax import weights
from frcnn_jax.config import config_from_file
from frcnn_jax.data.loader import Inputs
from frcnn_jax.models import FasterRCNN, build_model
from frcnn_jax.training.initial import init_state

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests import py_faster_rcnn

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
EVERY = 10**7  # a sampler batch larger than any candidate count: nothing is left out
SIZES = ((160, 256), (256, 192))  # (height, width): one landscape, one portrait image
CANVAS = (256, 256)  # torchvision pads the batch to the largest sides, multiples of 32
LOSS_NAMES = {  # frcnn_jax -> torchvision's loss dict
    "rpn_objectness": "loss_objectness",
    "rpn_box": "loss_rpn_box_reg",
    "fast_rcnn_class": "loss_classifier",
    "fast_rcnn_box": "loss_box_reg",
}


def batch(num_classes, seed=0):
    """Two images of different sizes with ground truth touching the border, tiny and large
    boxes: frcnn_jax's batch (images on a zero canvas) and torchvision's (images in 0-1, one
    tensor each, and target dicts). Other seeds: other pictures, the boxes moved by up to 24 px
    (clipped to the image) and other classes."""
    rng = np.random.default_rng(seed)
    boxes = [
        # 160 x 256: the border, a tiny box, a large one, two in between
        np.array(
            [
                [0, 20, 70, 110],
                [120, 40, 131, 49],
                [30, 10, 250, 155],
                [140, 60, 230, 160],
                [60, 70, 120, 130],
            ],
            np.float32,
        ),
        # 256 x 192: the bottom-right corner, a tiny box, a large one, one in between
        np.array(
            [[100, 180, 192, 256], [20, 30, 28, 36], [5, 5, 180, 240], [40, 60, 110, 150]],
            np.float32,
        ),
    ]
    classes = [(np.array(c) - 1) % num_classes + 1 for c in ([1, 18, 3, 62, 1], [44, 5, 1, 90])]
    if seed:
        for i, (height, width) in enumerate(SIZES):
            shift = np.tile(rng.integers(-24, 25, (len(boxes[i]), 2)), 2)  # (dx, dy, dx, dy)
            moved = np.clip(boxes[i] + shift, 0, [width, height, width, height])
            sides = moved[:, 2:] - moved[:, :2]
            boxes[i] = moved[(sides >= 4).all(axis=1)].astype(np.float32)
            classes[i] = rng.integers(1, num_classes + 1, len(boxes[i]))
    images, gt_boxes = np.zeros((2, *CANVAS, 3), np.float32), np.zeros((2, 8, 4), np.float32)
    gt_classes, gt_valid = np.zeros((2, 8), np.int32), np.zeros((2, 8), bool)
    for i, (height, width) in enumerate(SIZES):
        # blocks of colour with pixel noise: no two windows alike, so no max-pooling window
        # has tied maxima, whose gradient each library may route to a different pixel
        coarse = np.kron(rng.uniform(20, 235, (height // 8, width // 8, 3)), np.ones((8, 8, 1)))
        noise = rng.integers(-20, 21, (height, width, 3))
        images[i, :height, :width] = (coarse + noise).round()
        count = len(boxes[i])
        gt_boxes[i, :count], gt_classes[i, :count], gt_valid[i, :count] = boxes[i], classes[i], 1
    ours = Inputs(
        image=images,
        image_size=np.array(SIZES, np.int32),
        scale=np.ones(2, np.float32),
        gt_boxes=gt_boxes,
        gt_classes=gt_classes,
        gt_valid=gt_valid,
        gt_difficult=np.zeros_like(gt_valid),
        valid=np.ones(2, bool),
    )
    theirs_images = [
        torch.from_numpy(images[i, :h, :w].transpose(2, 0, 1) / 255).float()
        for i, (h, w) in enumerate(SIZES)
    ]
    theirs_targets = [
        {"boxes": torch.from_numpy(b), "labels": torch.from_numpy(c).long()}
        for b, c in zip(boxes, classes, strict=True)
    ]
    return ours, (theirs_images, theirs_targets)


def randomize_frozen_batch_norm(model, generator):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                n = module.weight.shape[0]
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(0.5 * torch.rand(n, generator=generator) + 0.25)
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))


def spread_predictor(cls_score, bbox_pred, generator):
    """Class logits spread over several units so that several classes are live, and box
    deltas that are not all ~0."""
    with torch.no_grad():
        cls_score.weight.mul_(5.0)
        cls_score.bias.copy_(2.0 * torch.randn(cls_score.bias.shape, generator=generator))
        bbox_pred.bias.copy_(0.1 * torch.randn(bbox_pred.bias.shape, generator=generator))


@dataclasses.dataclass
class Reference:
    """A torch detector and how to read it in frcnn_jax's terms."""

    module: torch.nn.Module
    # (images, targets, proposals=None) -> {our loss name: tensor}; `proposals` (float32
    # [P_i, 4] per image) replace the reference's own for the head, see `shared_proposals`
    losses: Callable
    convert: Callable  # {torch parameter name: tensor} -> {our flat param path: array}
    optimizer: Callable  # [(name, parameter)] -> torch.optim.SGD of the config's recipe
    export: Callable  # () -> (flat, covers): the starting weights as a frcnn_jax weight file
    # (images, targets, proposals=None) -> ReLU units whose bias `clear_relu_kinks` shifted
    clear_kinks: Callable
    frozen: tuple  # prefixes of the frozen parameters: (torch's, ours)
    num_frozen: int  # tensors frozen
    # the last `losses` call's training proposals per image (float32 [P_i, 4], no ground truth)
    proposals: list = dataclasses.field(default_factory=list)
    kinks_cleared: int = 0  # units shifted by `reference_and_ours`


def differing_proposals(ours, theirs):
    """Boxes in one of two proposal sets only (further than 1e-3 px from every box of the other),
    summed over images: float32 [P_i, 4] per image each."""
    count = 0
    for a, b in zip(ours, theirs, strict=True):
        if not len(a) or not len(b):
            count += len(a) + len(b)
            continue
        distance = np.abs(np.asarray(a)[:, None] - np.asarray(b)[None]).max(-1)  # [a, b]
        count += int((distance.min(1) > 1e-3).sum() + (distance.min(0) > 1e-3).sum())
    return count


POOL_MARGIN = 1e-5  # of a pool's largest input: the two libraries' inputs differ by ~3e-6
PASSES = 20  # VGG-16's ties need about 8


def clear_relu_kinks(hooks, run, ties=None):
    """Shift biases so that no ReLU input of a trained layer lies within 1e-6 of the layer's
    largest |input| from the kink, in one forward pass (`run`) that also applies the shifts.

    Why: a ReLU input within float32 rounding of 0 may switch on in one library and off in the
    other, which changes that unit's gradient and, through it, every layer below (what that
    amounts to: `python experiments/train_parity.py --steps 1 --keep-kinks`). With the shifts,
    the weights are as random as before and nothing sits on a kink.

    The same holds for 2x2 max pooling (VGG's): a window whose two largest inputs lie within
    float32 rounding of each other may send its gradient to one in one library and to the
    other in the other. Such a tie cannot be moved by a bias (it shifts both), so the kernel of
    the layer before the pool gets a small random change in that channel (1e-3 of the kernels'
    spread), and the next pass looks again. A tie that the change leaves in place is one in
    exact arithmetic (two identical input patches: the zero canvas outside the images), where
    either position gives the same kernel gradient; it stays.

    hooks: (module, [tensors], kind): "out" for a layer whose output a ReLU takes, "pre"
    for a ReLU module (its input), with the biases that shift them: the bias that shifts the
    input of the module's i-th call is biases[i % len(biases)] (a ResNet block's one ReLU runs
    after bn1, bn2 and the residual add); "pool" for a 2x2 stride-2 max pool, with the kernel of
    the layer before it. `ties` ({pool module: windows}) keeps the exact ties found from one
    call to the next. Returns the number of units shifted and pool channels changed; passes
    repeat until one changes nothing."""

    shifted = []  # units shifted (channels changed) in the current pass
    ties = {} if ties is None else ties
    generator = torch.Generator().manual_seed(2)

    def separate_ties(pre, kernel, pool):
        """Change `kernel`'s channels whose pooling windows hold near-tied maxima, but for
        the windows of earlier passes' changes (`ties[pool]`): ties in exact arithmetic."""
        h, w = pre.shape[2:]
        windows = pre.detach()[:, :, : h // 2 * 2, : w // 2 * 2]
        windows = windows.unflatten(2, (h // 2, 2)).unflatten(4, (w // 2, 2))
        top = windows.permute(0, 1, 2, 4, 3, 5).flatten(4).topk(2, dim=-1).values
        gap = top[..., 0] - top[..., 1]
        near = (gap > 0) & (gap < POOL_MARGIN * pre.abs().max()) & (top[..., 0] > 0)
        known = ties.setdefault(pool, torch.zeros_like(near))
        near &= ~known
        ties[pool] = known | near
        todo = near.transpose(0, 1).flatten(1).any(1)
        if todo.any():
            noise = torch.randn(kernel[todo].shape, generator=generator)
            with torch.no_grad():
                kernel[todo] += 1e-3 * kernel[todo].std() * noise
        shifted.append(int(todo.sum()))

    def shift(pre, bias):
        pre = pre.detach()
        units = pre.transpose(0, 1).flatten(1)  # [units, everything else]
        margin = 1e-6 * units.abs().max()
        offset = torch.zeros(len(units))
        for candidate in (3, -3, 6, -6, 9, -9):
            todo = (units + offset[:, None]).abs().min(1).values < margin
            offset[todo] = candidate * margin
        todo = offset != 0
        with torch.no_grad():
            bias[todo] += offset[todo]
        shifted.append(int(todo.sum()))
        view = (1, -1) + (1,) * (pre.ndim - 2)
        return pre + offset.view(view)

    def hook(module, biases, calls):
        def pre(_, inputs):
            calls.append(None)
            return (shift(inputs[0], biases[(len(calls) - 1) % len(biases)]),)

        def out(_, __, output):
            return shift(output, biases[0])

        def pool(_, inputs):
            separate_ties(inputs[0], biases[0], module)

        return pre, out, pool

    handles = []
    for module, biases, kind in hooks:
        pre, out, pool = hook(module, biases, [])
        if kind == "pre":
            handles.append(module.register_forward_pre_hook(pre))
        elif kind == "pool":
            handles.append(module.register_forward_pre_hook(pool))
        else:
            handles.append(module.register_forward_hook(out))
    total = 0
    for _ in range(PASSES):
        shifted.clear()
        with torch.no_grad():
            run()
        total += sum(shifted)
        if not sum(shifted):
            break
    else:
        raise AssertionError(f"ReLU kinks or pool ties still present after {PASSES} passes")
    for handle in handles:
        handle.remove()
    return total


# -- torchvision's fasterrcnn_resnet50_fpn -----------------------------------------------------


def coco_reference():
    """`fasterrcnn_resnet50_fpn` as torchvision builds it around ImageNet weights (frozen
    BatchNorm, stem and layer1 frozen: trainable_backbone_layers=3), with random weights:
    seeded, frozen-BN statistics random, objectness logits spread so that proposal ranks are
    well apart, class logits spread. Its transform keeps each image's pixels (the long side of
    both images is its max_size), so both sides see the same input."""
    torch.manual_seed(0)
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    model = TorchFasterRCNN(
        _resnet_fpn_extractor(body, 3),
        num_classes=91,
        min_size=1000,
        max_size=256,
        rpn_batch_size_per_image=EVERY,
        box_batch_size_per_image=EVERY,
    )
    generator = torch.Generator().manual_seed(1)
    randomize_frozen_batch_norm(model, generator)
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.mul_(30.0)
    predictor = model.roi_heads.box_predictor
    spread_predictor(predictor.cls_score, predictor.bbox_pred, generator)
    model.train()

    proposals = []

    def keep_proposals(_, args):  # RoIHeads.forward(features, proposals, image_shapes, ...)
        proposals[:] = [p.detach().numpy().copy() for p in args[1]]

    model.roi_heads.register_forward_pre_hook(keep_proposals)

    def losses(images, targets, proposals=None):
        transformed, _ = model.transform(images)
        assert transformed.tensors.shape[-2:] == CANVAS and transformed.image_sizes == list(SIZES)
        handle = None
        if proposals is not None:  # RegionProposalNetwork's output: (proposals, losses)
            given = [torch.from_numpy(np.asarray(p)) for p in proposals]
            handle = model.rpn.register_forward_hook(lambda _, __, out: (given, out[1]))
        out = model(images, targets)
        if handle is not None:
            handle.remove()
        return {ours: out[theirs] for ours, theirs in LOSS_NAMES.items()}

    def convert(tensors):
        """Through the weight converter: every layout change is linear, so it converts
        gradients and updates too. Missing parameters are zero."""
        state = model.state_dict()
        state.update({k: tensors.get(k, torch.zeros_like(v)) for k, v in model.named_parameters()})
        flat, _ = weights.from_torchvision(state, arch="fasterrcnn_resnet50_fpn")
        return {k[len("params/") :]: v for k, v in flat.items() if k.startswith("params/")}

    def optimizer(named):  # references/detection/train.py: one group, every parameter decayed
        return torch.optim.SGD([p for _, p in named], lr=0.02, momentum=0.9, weight_decay=1e-4)

    body = model.backbone.body
    blocks = [
        (block.relu, [block.bn1.bias, block.bn2.bias, block.bn3.bias], "pre")
        for stage in (2, 3, 4)  # layer1 and the stem are frozen: no gradient below layer2
        for block in getattr(body, f"layer{stage}")
    ]
    rpn_conv = model.rpn.head.conv[0][0]
    heads = [
        (rpn_conv, [rpn_conv.bias], "out"),
        (model.roi_heads.box_head.fc6, [model.roi_heads.box_head.fc6.bias], "out"),
        (model.roi_heads.box_head.fc7, [model.roi_heads.box_head.fc7.bias], "out"),
    ]

    def clear_kinks(images, targets, given=None):
        return clear_relu_kinks(blocks + heads, lambda: losses(images, targets, given))

    def export():
        return weights.from_torchvision(model.state_dict(), arch="fasterrcnn_resnet50_fpn")

    return Reference(
        module=model,
        losses=losses,
        convert=convert,
        optimizer=optimizer,
        export=export,
        clear_kinks=clear_kinks,
        frozen=(
            ("backbone.body.conv1.", "backbone.body.layer1."),
            ("backbone/body/conv1/", "backbone/body/layer1/"),
        ),
        num_frozen=11,  # the stem's conv and layer1's 10 (BatchNorm holds buffers only)
        proposals=proposals,
    )


def coco_config():
    config = config_from_file(os.path.join(CONFIGS, "coco_r50_fpn.py"))
    config.model.num_classes = 90  # torchvision's 91 outputs: labels are COCO category ids
    return config


# -- the paper's VGG-16 detector ---------------------------------------------------------------


def paper_reference(num_classes):
    """The paper's VGG-16 Faster R-CNN in torch: VGG-16's conv layers (conv1-conv2 frozen)
    and fc6/fc7 (torchvision's, dropout off), an RPN head with 2k softmax outputs (channel
    2a + c: anchor a, c = background / object), py-faster-rcnn's anchors and labels, the
    paper's loss weights; proposals by torchvision's `filter_proposals` (12000 -> NMS 0.7 ->
    2000, min size 16), RoIs by torchvision's `RoIHeads` sampling (ground truth appended, IoU
    0.5, boxes coded with weights 10, 10, 5, 5), RoIPool 7x7 at 1/16."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16()
    vgg.classifier[6] = torch.nn.Identity()  # ImageNet's 1000-way layer: not in the detector
    features = vgg.features[:-1]  # conv5_3 + ReLU, no pool5
    for index in (0, 2, 5, 7):  # conv1_1 - conv2_2: frozen in the paper
        features[index].requires_grad_(False)
    rpn = torch.nn.ModuleDict(
        {
            "conv": torch.nn.Conv2d(512, 512, 3, padding=1),
            "cls": torch.nn.Conv2d(512, 2 * 9, 1),
            "bbox": torch.nn.Conv2d(512, 4 * 9, 1),
        }
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in [
            m for m in vgg.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
        ]:
            # torchvision initialises VGG's biases to 0: the zero canvas would then give ReLU
            # inputs of exactly 0 everywhere outside the images (see `clear_relu_kinks`)
            layer.bias.copy_(0.05 * torch.randn(layer.bias.shape, generator=generator))
        for layer in rpn.values():
            layer.weight.copy_(0.01 * torch.randn(layer.weight.shape, generator=generator))
            layer.bias.zero_()
        rpn["cls"].weight.mul_(30.0)
    box_head = torch.nn.Sequential(
        torch.nn.Flatten(1), vgg.classifier[0], torch.nn.ReLU(), vgg.classifier[3], torch.nn.ReLU()
    )
    predictor = FastRCNNPredictor(4096, num_classes + 1)
    spread_predictor(predictor.cls_score, predictor.bbox_pred, generator)
    roi_heads = RoIHeads(
        None, box_head, predictor, 0.5, 0.5, EVERY, 0.25, None, 0.05, 0.3, 100
    )  # fg / bg IoU 0.5 (backgrounds from IoU 0: py-faster-rcnn's BG_THRESH_LO)
    proposal_filter = RegionProposalNetwork(
        AnchorGenerator(),
        None,
        0.7,
        0.3,
        EVERY,
        0.5,
        dict(training=12000, testing=6000),
        dict(training=2000, testing=300),
        0.7,
    )
    proposal_filter.min_size = 16.0  # 16 px of the original image (scale 1 here)
    module = torch.nn.ModuleDict({"vgg": vgg, "rpn": rpn, "predictor": predictor}).train()
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    kept = []  # the last call's proposals
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def losses(images, targets, given=None):
        # the canvas as frcnn_jax's: normalized images, zero outside each image
        x = torch.zeros(len(images), 3, *CANVAS)
        for i, image in enumerate(images):
            x[i, :, : image.shape[1], : image.shape[2]] = (image - mean) / std
        maps = features(x)
        t = F.relu(rpn["conv"](maps))
        logits = rpn["cls"](t).permute(0, 2, 3, 1).reshape(len(images), -1, 2)
        deltas = rpn["bbox"](t).permute(0, 2, 3, 1).reshape(len(images), -1, 4)
        anchors = torch.from_numpy(py_faster_rcnn.anchors(*maps.shape[2:]))
        labels, box_targets = [], []
        for (height, width), target in zip(SIZES, targets, strict=True):
            gt = target["boxes"]
            label, matched = py_faster_rcnn.anchor_labels(
                anchors.numpy(), gt.numpy(), height, width
            )
            labels.append(torch.from_numpy(label))
            box_targets.append(coder.encode_single(gt[matched], anchors))
        labels, box_targets = torch.stack(labels), torch.stack(box_targets)
        sampled, positive = labels >= 0, labels == 1
        rpn_box = F.smooth_l1_loss(
            deltas[positive], box_targets[positive], beta=1 / 9, reduction="sum"
        )
        terms = {
            "rpn_objectness": F.cross_entropy(logits[sampled], positive[sampled].long()),
            "rpn_box": 10.0 * rpn_box / (2400 * len(images)),  # lambda 10, N_reg 2400 / image
        }
        decoded = coder.decode_single(deltas.detach().reshape(-1, 4), anchors.repeat(2, 1))
        scores = (logits[..., 1] - logits[..., 0]).detach()  # the softmax's order
        proposals, _ = proposal_filter.filter_proposals(
            decoded.reshape(len(images), -1, 4), scores, list(SIZES), [len(anchors)]
        )
        kept[:] = [p.detach().numpy().copy() for p in proposals]
        if given is not None:
            proposals = [torch.from_numpy(np.asarray(p)) for p in given]
        rois, _, classes, regression = roi_heads.select_training_samples(proposals, targets)
        pooled = torchvision.ops.roi_pool(maps, rois, 7, 1 / 16)
        class_logits, box_deltas = predictor(box_head(pooled))
        classes, regression = torch.cat(classes), torch.cat(regression)
        foreground = torch.where(classes > 0)[0]
        own = box_deltas.reshape(len(classes), -1, 4)[foreground, classes[foreground]]
        box = F.smooth_l1_loss(own, regression[foreground], beta=1.0, reduction="sum")
        terms["fast_rcnn_class"] = F.cross_entropy(class_logits, classes)
        terms["fast_rcnn_box"] = box / len(classes)  # fastrcnn_loss with the paper's sigma 1
        return terms

    def convert(tensors):
        """VGG-16's layers through the weight converter, the RPN head and predictor here
        (kernels HWIO / [in, out]). Missing parameters are zero."""
        values = {
            k: tensors.get(k, torch.zeros_like(v)).detach().numpy()
            for k, v in module.named_parameters()
        }
        state = {k[len("vgg.") :]: v for k, v in values.items() if k.startswith("vgg.")}
        flat, _ = weights.from_torchvision(state, arch="vgg16")
        out = {k[len("params/") :]: v for k, v in flat.items()}
        for name in ("conv", "cls", "bbox"):
            out[f"rpn_head/{name}/kernel"] = values[f"rpn.{name}.weight"].transpose(2, 3, 1, 0)
            out[f"rpn_head/{name}/bias"] = values[f"rpn.{name}.bias"]
        for name in ("cls_score", "bbox_pred"):
            out[f"predictor/{name}/kernel"] = values[f"predictor.{name}.weight"].T
            out[f"predictor/{name}/bias"] = values[f"predictor.{name}.bias"]
        return out

    def optimizer(named):  # py-faster-rcnn's solver: biases at 2x lr, no decay (Caffe)
        kernels = [p for n, p in named if not n.endswith("bias")]
        biases = [p for n, p in named if n.endswith("bias")]
        return torch.optim.SGD(
            [dict(params=kernels, weight_decay=5e-4), dict(params=biases, lr=2e-3)],
            lr=1e-3,
            momentum=0.9,
        )

    trained_convs = [m for m in features if isinstance(m, torch.nn.Conv2d)][4:]  # conv3_1 on
    hooks = [(conv, [conv.bias], "out") for conv in trained_convs]
    hooks += [(layer, [layer.bias], "out") for layer in (rpn["conv"], box_head[1], box_head[3])]
    # pool3 and pool4: the pools whose gradient reaches trained layers (conv3_3, conv4_3)
    hooks += [(features[i], [features[i - 2].weight], "pool") for i in (16, 23)]

    ties = {}  # exact ties in the pools, kept from one call to the next

    def clear_kinks(images, targets, given=None):
        return clear_relu_kinks(hooks, lambda: losses(images, targets, given), ties)

    def export():
        flat = convert({k: p.detach() for k, p in module.named_parameters()})
        return {f"params/{k}": v for k, v in flat.items()}, ["params"]

    return Reference(
        module=module,
        losses=losses,
        convert=convert,
        optimizer=optimizer,
        export=export,
        clear_kinks=clear_kinks,
        frozen=(
            ("vgg.features.0.", "vgg.features.2.", "vgg.features.5.", "vgg.features.7."),
            ("backbone/conv1_", "backbone/conv2_"),
        ),
        num_frozen=8,  # conv1_1 - conv2_2, kernels and biases
        proposals=kept,
    )


def paper_config():
    config = config_from_file(os.path.join(CONFIGS, "voc07_vgg16.py"))
    config.model.head.dropout = 0.0  # random on both sides otherwise
    return config


# -- the comparison ----------------------------------------------------------------------------


DETECTORS = {  # name: (the reference, the frcnn_jax config it stands for, its class count)
    "coco_r50_fpn": (coco_reference, coco_config, 90),
    "voc07_vgg16": (lambda: paper_reference(20), paper_config, 20),
}


@functools.partial(jax.jit, static_argnums=0)
def _training_proposals(model, variables, *inputs):
    return model.apply(variables, *inputs, method=FasterRCNN.training_proposals)


def training_proposals(model, state, batch, precision="highest"):
    """frcnn_jax's training proposals for `batch`: (boxes float32 [B, P, 4], valid bool [B, P])
    and the valid boxes as float32 [P_i, 4] per image."""
    variables = {"params": state.params, **state.frozen}
    inputs = (batch.image, batch.image_size, batch.scale)
    with jax.default_matmul_precision(precision):
        boxes, valid = _training_proposals(model, variables, *inputs)
    return (boxes, valid), [np.asarray(b)[np.asarray(v)] for b, v in zip(boxes, valid, strict=True)]


def losses_on_proposals(model, params, frozen, batch, boxes, valid):
    """frcnn_jax's four training losses with the proposals fixed (boxes float32 [B, P, 4],
    valid bool [B, P]): `rpn_losses` + `head_losses`. Their gradient is `FasterRCNN.losses`'s:
    approximate joint training stops the gradient at the proposals anyway."""
    variables = {"params": params, **frozen}
    inputs = (batch.image, batch.image_size)
    gt = (batch.gt_boxes, batch.gt_classes, batch.gt_valid)
    key = jax.random.key(0)
    rpn = model.apply(variables, *inputs, *gt, key, method=FasterRCNN.rpn_losses)
    head = model.apply(variables, *inputs, boxes, valid, *gt, key, method=FasterRCNN.head_losses)
    return {**rpn, **head}


def relative_errors(got, want):
    """{tensor: largest |got - want| / largest |want|} over flat trees of arrays."""
    tiny = np.finfo(np.float32).tiny
    return {k: np.abs(got[k] - w).max() / max(np.abs(w).max(), tiny) for k, w in want.items()}


def reference_and_ours(name, directory, *, warmup=False, clear_kinks=True):
    """(the reference `Reference`, frcnn_jax's model, its initial `TrainState`, its optimizer)
    for detector `name`: frcnn_jax's config as a user trains it, with deterministic sampling, on
    `CANVAS`, starting from the reference's weights (written to `directory` and loaded through
    `model.init_checkpoint`); without `warmup`, the recipe's rate after its warm-up from the
    first step; `clear_kinks=False` keeps ReLU inputs on their kinks (to measure what that
    does)."""
    make_reference, make_config, num_classes = DETECTORS[name]
    reference = make_reference()
    ours_batch, (images, targets) = batch(num_classes)
    if clear_kinks:
        reference.kinks_cleared = reference.clear_kinks(images, targets)
    path = os.path.join(directory, f"{name}.npz")
    weights.save(path, *reference.export())
    config = make_config()
    config.data.canvas = CANVAS
    config.model.num_classes = num_classes
    config.model.rpn.batch_size = None
    config.model.head.batch_size = None
    config.model.init_checkpoint = path
    if not warmup:
        config.train.warmup_steps = 0
    model = build_model(config)
    state, tx = init_state(config, model)
    # The head on frcnn_jax's proposals (as the comparisons run it) meets RoIs the reference's
    # own proposals did not have: clear those RoIs' kinks too (head biases only: the backbone
    # and the RPN see the same pixels), and start frcnn_jax from the result.
    _, proposals = training_proposals(model, state, ours_batch)
    more = reference.clear_kinks(images, targets, proposals) if clear_kinks else 0
    if more:
        reference.kinks_cleared += more
        variables = {"params": state.params, **state.frozen}
        flat, covers = reference.export()  # copies: the reference's tensors change in place
        variables = weights.restore_into(
            variables, {k: np.array(v) for k, v in flat.items()}, covers
        )
        params = variables.pop("params")
        state = state.replace(params=params, frozen=variables, opt_state=tx.init(params))
    return reference, model, state, tx
