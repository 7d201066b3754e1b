"""``vgg16``: torchvision's VGG16 with its last layer replaced (tutorial §4.9)."""

from __future__ import annotations

from torch import nn

from ...core.errors import PipelineError
from ..registry import architecture


@architecture(build_only=("pretrained",), meaning={"pretrained": "start from ImageNet weights (a download)"})
def vgg16(num_classes: int = 10, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """torchvision's VGG16 modified as in §4.9: the last classifier layer is replaced.

    The tutorial shows two edits: appending a layer (``classifier.add_module``) or
    replacing ``classifier[6]``. Replacing keeps the 1000-way ImageNet head from sitting
    uselessly in front of ours, so that is what we do.
    """
    import torchvision

    weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1 if pretrained else None
    try:
        model = torchvision.models.vgg16(weights=weights)
    except Exception as e:  # the weights come from the internet
        raise PipelineError(
            f"cannot load VGG16's pretrained weights ({type(e).__name__}: {e}); "
            "set model.pretrained=false, or put the file in torch's hub cache (TORCH_HOME)"
        ) from None
    model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    return model
