"""The per-image RPN and head functions with the paper's settings (`RPNSettings` /
`HeadSettings` defaults) filled in, for tests that vary one or two of them."""

from frcnn_jax.models import roi_heads, rpn

PAPER_RPN = rpn.RPNSettings()
PAPER_HEAD = roi_heads.HeadSettings()


def rpn_targets(*args, **overrides):
    settings = dict(
        positive_iou=PAPER_RPN.positive_iou,
        negative_iou=PAPER_RPN.negative_iou,
        batch_size=PAPER_RPN.batch_size,
        positive_fraction=PAPER_RPN.positive_fraction,
        allowed_border=PAPER_RPN.allowed_border,
    )
    return rpn.rpn_targets(*args, **{**settings, **overrides})


def sample_proposals(*args, **overrides):
    settings = dict(
        batch_size=PAPER_HEAD.batch_size,
        positive_fraction=PAPER_HEAD.positive_fraction,
        foreground_iou=PAPER_HEAD.foreground_iou,
        background_iou=PAPER_HEAD.background_iou,
    )
    return roi_heads.sample_proposals(*args, **{**settings, **overrides})


def generate_proposals(*args, **overrides):
    """`rpn.generate_proposals` (or the multi-level one for lists) with NMS 0.7 and no minimum
    size unless overridden."""
    settings = dict(nms_threshold=PAPER_RPN.nms_threshold, min_size=0.0)
    generate = (
        rpn.generate_multilevel_proposals if isinstance(args[0], list) else rpn.generate_proposals
    )
    return generate(*args, **{**settings, **overrides})


def detect(*args, **overrides):
    """`roi_heads.detect` with the paper's test settings, scale 1, unless overridden."""
    settings = dict(
        scale=1.0,
        score_threshold=PAPER_HEAD.score_threshold,
        nms_threshold=PAPER_HEAD.nms_threshold,
        max_detections=PAPER_HEAD.max_detections,
        pre_nms_top_n=None,
    )
    return roi_heads.detect(*args, **{**settings, **overrides})
