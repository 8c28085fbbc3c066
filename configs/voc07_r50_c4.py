"""ResNet-50 C4 (He et al. 2016's detection setup) on VOC 2007: res5 runs on each 14x14 RoI.

From ImageNet weights: `python -m frcnn_jax.import_weights --arch resnet50 --body c4 --input
resnet50-0676ba61.pth --output weights/r50_c4.npz`, then
`--config.model.init_checkpoint=weights/r50_c4.npz` (stem to res4 as the backbone, res5 as the
box head)."""

import pathlib

from frcnn_jax.config import config_from_file


def get_config(arg=None):
    del arg
    c = config_from_file(pathlib.Path(__file__).with_name("voc07_vgg16.py"))
    c.model.backbone = "resnet50_c4"  # stem + layer1 frozen, frozen BatchNorm
    c.model.rpn.channels = 1024
    c.model.head.box_head = "res5"
    c.model.head.pooler = "align"
    c.model.head.output_size = 14  # res5 halves it to 7
    c.model.head.widths = ()
    c.train.learning_rate = 1e-3
    return c
