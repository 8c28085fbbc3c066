"""VGG-16 on VOC 2007 trainval + VOC 2012 trainval ("07+12"), tested on VOC 2007 test:
73.2 mAP in the paper (Table 3). Same model as voc07_vgg16.py; more data, longer schedule."""

import pathlib

from frcnn_jax.config import config_from_file


def get_config(arg=None):
    del arg
    c = config_from_file(pathlib.Path(__file__).with_name("voc07_vgg16.py"))
    c.data.name = "voc/2007,voc/2012"  # a union: the training split applies to each
    c.data.train_split = "train+validation"  # 16551 images
    c.eval.data_name = "voc/2007"  # VOC 2007 test only (VOC 2012 test has no public labels)
    c.train.batch_size = 1
    c.train.num_steps = 110000  # 80k at 1e-3, 30k at 1e-4, 1 image per step
    c.train.lr_steps = (80000,)
    return c
