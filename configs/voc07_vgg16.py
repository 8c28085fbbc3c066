"""The paper's headline (Table 3): VGG-16 trained on VOC 2007 trainval, tested on VOC 2007 test,
reported 69.9 mAP (with ImageNet-pretrained VGG-16: set model.init_checkpoint).

    python -m frcnn_jax.train --config configs/voc07_vgg16.py --workdir runs/voc07_vgg16
"""

from frcnn_jax.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.data.name = "voc/2007"
    c.data.train_split = "train+validation"  # paper: VOC 2007 trainval (5011 images)
    c.data.min_size = 600  # paper: 600
    c.data.max_size = 1000  # paper: 1000
    c.data.canvas = (600, 1000)
    c.data.max_boxes = 64
    c.model.backbone = "vgg16"  # conv1-conv2 frozen, as in the paper
    c.model.num_classes = 20
    # RPN and head: the paper's values are RPNSettings / HeadSettings' defaults (RoIPool 7x7,
    # fc6/fc7 4096, 128 RoIs, 12000/2000 and 6000/300 proposals, lambda 10).
    c.train.batch_size = 1  # paper: 1 image per step
    c.train.num_steps = 80000  # paper: 60k + 20k images
    c.train.learning_rate = 1e-3  # paper: 1e-3 ...
    c.train.lr_steps = (60000,)  # ... then 1e-4 for the last 20k
    c.train.log_every = 50
    c.train.checkpoint_every = 2000
    c.eval.split = "test"
    c.eval.batch_size = 1
    c.eval.metric = "voc07"  # paper: VOC07 11-point
    return c
