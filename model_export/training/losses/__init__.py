"""Training losses of GLIP / GLIPv2: `L = L_loc + L_intra + L_inter + L_mlm`, one module per term.

- `localization` (L_loc): ATSS assignment of anchors to ground-truth boxes, a GIoU loss on the
  decoded boxes weighted by centerness targets (the centerness BCE is in `detection`).
- `intra` (L_intra): the region-token "classification as matching" loss, a sigmoid focal loss on
  the dot-product logits of the fused features against the token positive map of the matched box.
- `soft_token`: MDETR's soft token prediction (not in GLIP; off unless weighted).
- `detection`: L_loc + L_intra (and the soft token loss) over the head outputs of a batch,
  normalised as the reference.
- `inter` (L_inter): GLIPv2's inter-image region-word contrastive loss on features *before*
  fusion, all sampled regions of the batch against all tokens of the batch, with label
  propagation.
- `mlm` (L_mlm): masked-language modelling on the fused text features (BERT's 80/10/10 masking).
- `text_attention`: tokens' attention onto their objects (not in GLIP or GLIPv2).
- `targets`: the ground truth of one image the losses read.

Reference: microsoft/GLIP `modeling/rpn/loss.py`, `layers/sigmoid_focal_loss.py`,
`structures/boxlist_ops.py` and `modeling/detector/generalized_vl_rcnn.py`. Boxes are `xyxy`
pixels of the padded model input, as the anchors. Where we deliberately differ from the
reference, the module and function docstrings say so.
"""

from model_export.training.losses.detection import (
    DetectionLosses,
    detection_losses,
    flatten_head_outputs,
)
from model_export.training.losses.inter import (
    PromptInfo,
    contrastive_region_inputs,
    inter_image_contrastive_loss,
    inter_image_contrastive_targets,
    multi_positive_nll,
)
from model_export.training.losses.intra import token_sigmoid_focal_loss
from model_export.training.losses.localization import (
    ATSS_INSIDE_MARGIN,
    ATSS_TOP_K,
    GIOU_LOSS_WEIGHT,
    atss_assign,
    atss_assign_batch,
    centerness_targets,
    giou_loss,
    match_anchors,
)
from model_export.training.losses.mlm import (
    MLM_IGNORE_INDEX,
    SpecialTokenIds,
    mask_tokens,
    mlm_loss,
)
from model_export.training.losses.soft_token import soft_token_loss
from model_export.training.losses.targets import ImageTargets
from model_export.training.losses.text_attention import text_attention_loss

__all__ = [
    "ATSS_INSIDE_MARGIN",
    "ATSS_TOP_K",
    "GIOU_LOSS_WEIGHT",
    "MLM_IGNORE_INDEX",
    "DetectionLosses",
    "ImageTargets",
    "PromptInfo",
    "SpecialTokenIds",
    "atss_assign",
    "atss_assign_batch",
    "centerness_targets",
    "contrastive_region_inputs",
    "detection_losses",
    "flatten_head_outputs",
    "giou_loss",
    "inter_image_contrastive_loss",
    "inter_image_contrastive_targets",
    "mask_tokens",
    "match_anchors",
    "mlm_loss",
    "multi_positive_nll",
    "soft_token_loss",
    "text_attention_loss",
    "token_sigmoid_focal_loss",
]
