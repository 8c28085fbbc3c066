"""The paper's fast net: ZF on VOC 2007 trainval, 59.9 mAP on VOC 2007 test (Table 3).

torchvision has no ImageNet ZF: a converted Caffe ZF model (BGR, mean-only: set
model.channel_order="bgr", pixel_mean=(102.98, 115.95, 122.77), pixel_std=(1, 1, 1)) can be
saved with `frcnn_jax.weights.save` under the parameter paths of `frcnn_jax.models.ZF`."""

import pathlib

from frcnn_jax.config import config_from_file


def get_config(arg=None):
    del arg
    c = config_from_file(pathlib.Path(__file__).with_name("voc07_vgg16.py"))
    c.model.backbone = "zf"  # conv1-conv5, nothing frozen
    c.model.rpn.channels = 256  # paper: 256-d for ZF
    c.model.head.output_size = 6  # paper / py-faster-rcnn ZF: RoI pooling 6x6 (VGG-16: 7x7)
    return c
