"""The paper's fast net: ZF on VOC 2007 trainval, 59.9 mAP on VOC 2007 test (Table 2, RPN with
shared features and 300 proposals).

No ImageNet ZF weights exist to import (torchvision has no ZF; the paper's is a Caffe model).
Pretrain one on ImageNet (TFDS `imagenet2012`, which you download), then fine-tune from it:

    python -m frcnn_jax.pretrain --config configs/pretrain_imagenet_zf.py --workdir runs/zf_in1k
    python -m frcnn_jax.train --config configs/voc07_zf.py --workdir runs/voc07_zf \
        --config.model.init_checkpoint=runs/zf_in1k/backbone.npz

(the same RGB input statistics in both configs). A converted Caffe ZF model (BGR, mean-only:
model.channel_order="bgr", pixel_mean=(102.98, 115.95, 122.77), pixel_std=(1, 1, 1)) can
instead be saved with `frcnn_jax.weights.save` under the parameter paths of
`frcnn_jax.models.ZF`."""

import pathlib

from frcnn_jax.config import config_from_file


def get_config(arg=None):
    del arg
    c = config_from_file(pathlib.Path(__file__).with_name("voc07_vgg16.py"))
    c.model.backbone = "zf"  # conv1-conv5, nothing frozen
    c.model.rpn.channels = 256  # paper: 256-d for ZF
    c.model.head.output_size = 6  # paper / py-faster-rcnn ZF: RoI pooling 6x6 (VGG-16: 7x7)
    return c
