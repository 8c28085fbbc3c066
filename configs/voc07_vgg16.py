"""The paper's headline (Table 3): VGG-16 trained on VOC 2007 trainval, tested on VOC 2007 test,
reported 69.9 mAP, starting from ImageNet-pretrained VGG-16 (conv layers and fc6/fc7):

    python -m frcnn_jax.import_weights --arch vgg16 --input vgg16-397923af.pth \
        --output weights/vgg16.npz
    python -m frcnn_jax.train --config configs/voc07_vgg16.py --workdir runs/voc07_vgg16 \
        --config.model.init_checkpoint=weights/vgg16.npz

(torchvision's ImageNet VGG-16 and its RGB input statistics, the config's defaults; the
paper's Caffe model needs channel_order "bgr" and its means, see frcnn_jax/weights.py.)

Schemes: the paper's 69.9 comes from 4-step alternating training
(`--config.train.scheme=alternating`, with py-faster-rcnn's alt-opt stage lengths below);
approximate joint training (the default here) is py-faster-rcnn's faster default, its end2end
solver, whose schedule this file follows. The README's "paper recipe" table lists every
setting beside the paper's / py-faster-rcnn's value and the test that checks it.
"""

from frcnn_jax.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.data.name = "voc/2007"
    c.data.train_split = "train+validation"  # paper: VOC 2007 trainval (5011 images)
    c.data.min_size = 600  # paper: 600
    c.data.max_size = 1000  # paper: 1000
    c.data.canvas = (600, 1000)  # landscape; portrait images use (1000, 600)
    c.data.max_boxes = 64
    c.model.backbone = "vgg16"  # conv1-conv2 frozen, as in the paper
    c.model.num_classes = 20
    # RPN and head: the paper's values are RPNSettings / HeadSettings' defaults (RoIPool 7x7,
    # fc6/fc7 4096, 128 RoIs, 12000/2000 and 6000/300 proposals, lambda 10).
    c.model.rpn.anchor_style = "py-faster-rcnn"  # its generate_anchors: centred in each cell
    c.model.head.background_iou = (0.0, 0.5)  # py-faster-rcnn BG_THRESH_LO 0.0 (Fast R-CNN: 0.1)

    # py-faster-rcnn's end2end solver: 70k iterations of 2 images (1 image, iter_size 2),
    # lr 1e-3, x0.1 at 50k, momentum 0.9, weight decay 5e-4.
    c.train.batch_size = 2
    c.train.num_steps = 70000
    c.train.learning_rate = 1e-3
    c.train.lr_steps = (50000,)
    c.train.bias_lr_factor = 2.0  # py-faster-rcnn: biases at lr_mult 2, no weight decay
    # py-faster-rcnn's alt-opt solvers, used with train.scheme=alternating: RPN 80k (x0.1 at
    # 60k), Fast R-CNN 40k (x0.1 at 30k), RPN 80k, Fast R-CNN 40k.
    c.train.alternating_phase_steps = (80000, 40000, 80000, 40000)
    c.train.alternating_phase_lr_steps = (60000, 30000, 60000, 30000)
    c.train.alternating_phase_batch_sizes = (1, 2, 1, 2)  # RPN: 1 image, Fast R-CNN: 2
    c.train.log_every = 50
    c.train.checkpoint_every = 2000
    c.eval.split = "test"
    c.eval.batch_size = 1
    c.eval.metric = "voc07"  # paper: VOC07 11-point
    return c
