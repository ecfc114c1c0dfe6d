"""What model: the registry, the study's four, the torchvision baselines, pretrained weights, the
checkpoint format, and what a TrainConfig builds (``build``).

Every model takes a float batch N x 3 x H x W (any H, W >= its ``min_image_size``) and returns logits
N x num_classes, for any ``num_classes >= 2``.

=====================  ======  ========  ===============================================================
name                   family  min size  description
=====================  ======  ========  ===============================================================
``cnn2x32``            study   32        study Model 1: 2 conv(32), each + 2x2 max-pool; dense 64
``cnn4x64``            study   32        study Model 2: 4 conv(64), each + 2x2 max-pool; dense 256
``cnn4x32``            study   32        study Model 3: 4 conv(32), each + 2x2 max-pool; dense 64
``vgg3``               study   32        study Model 4: 3 VGG blocks of 2 conv (32/64/128); dense 128
``resnet18``           modern  32        torchvision ResNet-18; CIFAR stem (3x3/1, no max-pool) <= 64 px
``efficientnet_b0``    modern  32        torchvision EfficientNet-B0
``mobilenet_v3_small`` modern  32        torchvision MobileNetV3-Small
``mobilenet_v2``       modern  32        torchvision MobileNetV2
=====================  ======  ========  ===============================================================

The study's four ("study" family) follow the Kaggle blood-cell study: 3x3 convolutions (padding 1),
ReLU, 2x2 max-pooling. Where the study is silent or its choice ties a model to one input size, we
chose, and the builders say so:

- ``norm="batch"`` (default) puts BatchNorm after each convolution. Without it these plain stacks
  train poorly from scratch, which is the likely reason two of the study's models stayed at chance
  (25 %); ``norm="none"`` gives the study's plain stacks back.
- ``pool_first=True`` (default): a convolution followed by a max-pool is pooled straight away, then
  normalised and rectified (conv, pool, BN, ReLU), instead of conv, BN, ReLU, pool. Max-pooling
  commutes with ReLU and with any per-channel increasing map, so the layers compute the same kind
  of function (exactly the same one without BatchNorm), while BatchNorm and ReLU, which are
  memory-bound on a CPU, touch a quarter of the values: training runs 1.3-2x faster (bench/RESULTS.md). Checkpoints that do not name the option load in the order their weights fit.
- The study flattened the last feature map (Keras ``Flatten``), which fixes the dense layer's size
  to one input size. We put ``AdaptiveAvgPool2d(4)`` before the flatten: at the study's kind of
  input this is a flatten of a 4 x 4 map, and the same weights accept any size >= 32 px (smaller
  maps, e.g. 2 x 2 after four pools on 32 px, are replicated up to 4 x 4).
- Each has one hidden dense layer (ReLU) whose width the builder names, then ``Dropout(dropout)``
  (default 0.3, for all four) before the output layer.

The modern baselines ("modern" family) are torchvision's, randomly initialised unless
``get_model(..., pretrained=True)``: then their ImageNet weights come through torchvision's weights
API from the torch cache, downloaded once (``bloodcell.models.pretrained``), a new classifier for our
classes, and resnet18 keeps its ImageNet stem at any size. They take ``norm="batch"`` or ``"group"``
(GroupNorm in place of every BatchNorm, as in the study's four; from scratch only: the ImageNet
weights are batch-norm ones). Any timm model is ``timm/<name>`` (the timm extra), pretrained through
timm and the Hugging Face cache. ``get_model(..., weights=path)`` loads a local state_dict for any
model instead (keys whose shapes differ, such as another classifier, are dropped and reported in a
warning); with ``pretrained`` that file holds the pretrained weights.

Any model can start with a stain normalisation, ``get_model(..., stain_norm="image"|"gray")``: the
``StainNorm`` layer standardises each image's colour channels (``image``) or its grey level
(``gray``) before the first convolution, so a lab's stain and lighting cast is gone before the
model sees the cells. Being part of the model, it travels in the checkpoint and the exported
files, and predict, serve and evaluate apply it without knowing it is there. Two trained models of
one task, one reading colour and one grey levels, join into one ``ColourGate`` (``models.gate``,
`bloodcell gate`): each image is read by the colour model where its colours look like a training
lab's, else by the grey-level one; its checkpoint names the model ``colourgate``.
"""

from bloodcell.models import baselines, study  # noqa: F401 - fill the registry
from bloodcell.models.baselines import baseline_norm
from bloodcell.models.registry import (
    GROUPS,
    NORMS,
    STAIN_NORMS,
    StainNorm,
    StainNormed,
    count_parameters,
    get_model,
    group_norm,
    list_models,
    load_weights,
    model_info,
    norm_layer,
    register_model,
)
from bloodcell.models.study import conv_block, plain_cnn

__all__ = ["GROUPS", "NORMS", "STAIN_NORMS", "StainNorm", "StainNormed", "baseline_norm", "conv_block",
           "count_parameters", "get_model", "group_norm", "list_models", "load_weights", "model_info",
           "norm_layer", "plain_cnn", "register_model"]
