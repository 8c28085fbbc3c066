"""ImageNet pretraining of the paper's ZF net (conv1-conv5), the start `configs/voc07_zf.py`
needs: no ZF ImageNet weights exist to import.

    python -m frcnn_jax.pretrain --config configs/pretrain_imagenet_zf.py --workdir runs/zf_in1k

TFDS `imagenet2012` must be prepared first (TFDS asks for the ILSVRC2012 tar files in its
manual_dir; `--config.data.data_dir` points at that TFDS data_dir). torchvision's classification
recipe at 224 pixels: SGD 0.1, cosine, 90 epochs of batch 256 (`frcnn_jax.pretraining.config`);
ZF's conv5 is averaged over space into a linear 1000-way layer (the paper's ZF had fc6-fc8; the
detector uses conv1-conv5 only).
"""

from frcnn_jax.pretraining import pretrain_config


def get_config(arg=None):
    del arg
    c = pretrain_config()
    c.model.backbone = "zf"
    return c
