"""torchvision's `fasterrcnn_resnet50_fpn` recipe on COCO 2017 (37.0 box AP with ImageNet
weights): 16 images per step, lr 0.02, 26 epochs with decays at 16 and 22, min/max size
800/1333. Evaluated with pycocotools on val2017.

Its inference settings are torchvision's (anchors, 1000 proposals per level then 1000 in all,
score threshold 0.05, NMS 0.5, 100 detections, short side 800 / long side <= 1333), so the
imported COCO detector gives torchvision's detections (tests/test_weights.py):

    python -m frcnn_jax.import_weights --arch fasterrcnn_resnet50_fpn --coco80 \
        --input fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --output runs/coco_r50_fpn.npz
    python -m frcnn_jax.evaluate --config configs/coco_r50_fpn.py --workdir runs/coco \
        --config.model.init_checkpoint=runs/coco_r50_fpn.npz  # (or train from it)

torchvision's head has 91 outputs: background + COCO category ids 1..90, 10 of them unused.
TFDS `coco/2017` labels the 80 used categories 0..79 (`frcnn_jax.weights.COCO_CATEGORY_IDS`
maps them to ids): `--coco80` keeps those rows, for `model.num_classes=80` (this file). Without
it, `--config.model.num_classes=90` keeps all 91 rows (labels = COCO category ids). From
ImageNet weights instead: `--arch resnet50 --body fpn`.
"""

from frcnn_jax.config import base_config, torchvision_heads

STEPS_PER_EPOCH = 117266 // 16


def get_config(arg=None):
    del arg
    c = base_config()
    c.data.name = "coco/2017"
    c.data.train_split = "train"
    c.data.min_size = 800  # torchvision: 800
    c.data.max_size = 1333  # torchvision: 1333
    c.data.canvas = (800, 1344)  # 1344 x 800 for portrait images; multiples of 32 (FPN)
    c.data.max_boxes = 100
    c.data.exclude_difficult = True  # COCO "iscrowd" regions are not targets

    c.model.backbone = "resnet50_fpn"
    c.model.num_classes = 80
    c.model.rpn.anchor_sizes = ((32,), (64,), (128,), (256,), (512,))
    c.model.rpn.channels = 256
    torchvision_heads(c.model)  # torchvision's RPN/head settings (2000 / 1000 proposals)

    c.train.batch_size = 16  # torchvision: 2 images x 8 GPUs
    c.train.num_steps = 26 * STEPS_PER_EPOCH
    c.train.learning_rate = 0.02
    c.train.lr_steps = (16 * STEPS_PER_EPOCH, 22 * STEPS_PER_EPOCH)
    c.train.warmup_steps = 1000
    c.train.weight_decay = 1e-4
    c.train.weight_decay_on = "all"  # torchvision's references decay biases too
    c.train.checkpoint_every = 5000
    c.eval.split = "validation"
    c.eval.batch_size = 8
    c.eval.metric = "voc_area"
    c.eval.coco = True
    return c
