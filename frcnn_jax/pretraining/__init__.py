"""Classification pretraining of any detector backbone (`python -m frcnn_jax.pretrain`): the
paper's detectors start from ImageNet-pretrained networks, and this makes such a start for a
backbone torchvision has no weights for (ZF, the tiny backbones) or from a user's own data.

One concept per module: `config` (the config's sections and rules), `data` (classification
examples and their loader), `model` (backbone + pooled linear classifier) and `loop` (training,
top-1 / top-5, the backbone's weights file).
"""

from frcnn_jax.pretraining.config import check_pretrain_config, pretrain_config
from frcnn_jax.pretraining.loop import WEIGHTS_FILE, evaluate, pretrain_and_evaluate
from frcnn_jax.pretraining.model import Classifier, build_classifier

__all__ = [
    "WEIGHTS_FILE",
    "Classifier",
    "build_classifier",
    "check_pretrain_config",
    "evaluate",
    "pretrain_and_evaluate",
    "pretrain_config",
]
