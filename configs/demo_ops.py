"""Config of the box-ops walkthrough (`python -m frcnn_jax.demo`): the paper's RPN settings.

A stand-in main job until training lands: it runs the RPN's target assignment and proposal
selection on synthetic ground truth, with the sizes of VGG-16 on a 600 x 1000 image.
"""

import ml_collections


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.image_height = 600  # paper: short side 600
    config.image_width = 1000  # paper: long side <= 1000
    config.stride = 16  # paper: VGG-16 conv5_3 stride
    config.anchor_sizes = (128, 256, 512)  # paper: scales 128^2, 256^2, 512^2
    config.aspect_ratios = (0.5, 1.0, 2.0)  # paper: 1:2, 1:1, 2:1
    config.num_gt = 5  # synthetic ground-truth boxes in the image
    config.max_gt = 16  # G: ground-truth slots (padded)
    config.rpn_positive_iou = 0.7  # paper: 0.7
    config.rpn_negative_iou = 0.3  # paper: 0.3
    config.rpn_batch_size = 256  # paper: 256 anchors per image
    config.rpn_positive_fraction = 0.5  # paper: up to 1:1
    config.pre_nms_top_n = 12000  # paper (training): 12000
    config.post_nms_top_n = 2000  # paper (training): 2000
    config.nms_iou = 0.7  # paper: 0.7
    config.repeats = 10  # timed runs of the jitted pipeline
    return config
