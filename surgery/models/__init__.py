"""Models: load torchvision, timm and open_clip classifiers by spec, and checkpoints without pickle.

``load_model("timm:resnet50", pretrained=True)``; ``load_model(spec, checkpoint=PATH)`` for local
weights; ``surgery:efficientnet_lite0`` is a real ImageNet model that loads offline.
"""

from surgery.models.checkpoints import load_checkpoint_into, read_checkpoint
from surgery.models.loading import SPEC_FORMS, efficientnet_lite0, imagenet_classes, load_model

__all__ = ["load_model", "SPEC_FORMS", "efficientnet_lite0", "imagenet_classes", "read_checkpoint", "load_checkpoint_into"]
