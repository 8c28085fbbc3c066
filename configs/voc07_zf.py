"""The paper's fast net: ZF on VOC 2007 trainval, 59.9 mAP on VOC 2007 test (Table 3)."""

import pathlib

from frcnn_jax.config import config_from_file


def get_config(arg=None):
    del arg
    c = config_from_file(pathlib.Path(__file__).with_name("voc07_vgg16.py"))
    c.model.backbone = "zf"  # conv1-conv5, nothing frozen
    c.model.rpn.channels = 256  # paper: 256-d for ZF
    c.model.head.output_size = 6  # paper / py-faster-rcnn ZF: RoI pooling 6x6 (VGG-16: 7x7)
    return c
