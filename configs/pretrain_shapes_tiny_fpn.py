"""The shapes world's "ImageNet" pretraining: the tiny FPN backbone of `shapes_tiny.py` on the
offline `shapes_classes` set (16 classes, 64x64 crops; see frcnn_jax/data/shapes_classes.py).

    python -m frcnn_jax.pretrain --config configs/pretrain_shapes_tiny_fpn.py --workdir /tmp/pre
    python -m frcnn_jax.train --config configs/shapes_tiny.py --workdir /tmp/det \\
        --config.model.init_checkpoint=/tmp/pre/backbone.npz
"""

from frcnn_jax.pretraining import pretrain_config


def get_config(arg=None):
    del arg
    c = pretrain_config()
    c.data.name = "shapes_classes/64"
    c.data.image_size = 64
    c.data.crop_scale = (0.5, 1.0)  # the object fills 30-90% of an image's side: keep most of it
    c.data.eval_crop = 1.0
    c.model.backbone = "tiny_fpn"
    c.model.num_classes = 16
    c.train.batch_size = 128
    c.train.num_steps = 3000
    c.train.learning_rate = 0.1
    c.train.warmup_steps = 100
    c.train.weight_decay = 1e-4
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.eval.batch_size = 250
    return c
