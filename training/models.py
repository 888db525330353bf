"""The two architectures: ``seed`` (the baseline of the design) and ``default`` (ours).

Both take NHWC float32 slices in [0, 1] from ``node.preprocessing``. Outputs,
in this order:

- ``p_malignant``: P(malignant) per slice, shape (n, 1) (both architectures);
- ``score_map``: P(malignant) per location, shape (n, size / stride, size / stride, 1)
  (``default`` only): the sigmoid of the ``logit_map`` whose global maximum gives
  ``p_malignant``, so ``p_malignant`` equals the map's maximum exactly.
"""

from __future__ import annotations

from typing import Any

INPUT_NAME = "slices"
OUTPUT_NAME = "p_malignant"
MAP_OUTPUT_NAME = "score_map"
LOGIT_MAP_LAYER = "logit_map"
#: The score map's stride (input pixels per map cell) when not configured otherwise.
MAP_STRIDE = 4
MAP_STRIDES = (4, 8, 16)


def build_seed(size: int, channels: int, map_stride: int = MAP_STRIDE) -> Any:  # noqa: ARG001 - no map
    """Conv2D 32/64/128 3x3 ReLU, each with 2x2 max-pool, Flatten, Dense 512, Dense 1 sigmoid.

    44.4 M parameters at 224 x 224 x 1 (almost all in the Dense 512 after Flatten). No score map.
    """
    import keras
    from keras import layers

    x = inp = keras.Input((size, size, channels), name=INPUT_NAME)
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    out = layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME)(x)
    return keras.Model(inp, out, name="seed")


def _conv_bn_relu(x: Any, filters: int, kernel: int = 3) -> Any:
    from keras import layers

    x = layers.Conv2D(filters, kernel, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.ReLU()(x)


def build_default(size: int | None, channels: int, map_stride: int = MAP_STRIDE) -> Any:
    """A fully convolutional encoder with a small top-down decoder and a max-pooled score map.

    Encoder: four Conv-BN-ReLU blocks (32/64/128/256, each followed by 2x2
    max-pool) and one more 256 conv at stride 16. Decoder (feature-pyramid
    style): the stride-16 features, reduced to 64 channels, are upsampled x2
    (nearest) and added to a 1x1 projection of the encoder block at that
    stride, then a 3x3 Conv-BN-ReLU; repeated down to ``map_stride`` (4: the
    block-3 features, 8: block 4). A 1x1 conv gives the malignancy logit of
    every map cell (``logit_map``); its global maximum is the slice logit.
    So the slice score is the score of the worst spot, and both outputs agree
    by construction. Input sides must be multiples of 16; patches and whole
    slices run through the same weights (``size=None``: any size).
    """
    import keras
    from keras import layers

    if map_stride not in MAP_STRIDES:
        raise ValueError(f'Argument "map_stride" must be one of {MAP_STRIDES}, got {map_stride}')
    x = inp = keras.Input((size, size, channels), name=INPUT_NAME)
    skips: dict[int, Any] = {}
    stride = 1
    for filters in (32, 64, 128, 256):
        x = _conv_bn_relu(x, filters)
        skips[stride] = x
        x = layers.MaxPooling2D(2)(x)
        stride *= 2
    x = _conv_bn_relu(x, 256)
    x = layers.Dropout(0.2)(x)
    if map_stride < 16:
        x = layers.Conv2D(64, 1, use_bias=False)(x)
        while stride > map_stride:
            stride //= 2
            x = layers.UpSampling2D(2, interpolation="nearest")(x)
            x = layers.Add()([x, layers.Conv2D(64, 1, use_bias=False)(skips[stride])])
            x = _conv_bn_relu(x, 64)
    logits = layers.Conv2D(1, 1, name=LOGIT_MAP_LAYER)(x)
    p = layers.Activation("sigmoid", name=OUTPUT_NAME)(layers.GlobalMaxPooling2D()(logits))
    score_map = layers.Activation("sigmoid", name=MAP_OUTPUT_NAME)(logits)
    return keras.Model(inp, [p, score_map], name="default")


def build_model(arch: str, size: int | None, channels: int, map_stride: int = MAP_STRIDE) -> Any:
    """The named architecture (``seed`` or ``default``); ``size=None``: any input size (``default`` only)."""
    builders = {"seed": build_seed, "default": build_default}
    if arch not in builders:
        raise ValueError(f'Argument "arch" must be one of {sorted(builders)}, got {arch!r}')
    return builders[arch](size, channels, map_stride)


def has_map(model: Any) -> bool:
    """Whether ``model`` has the score map output."""
    return len(model.outputs) > 1


def output_names(model: Any) -> list[str]:
    """The exported output names, slice probability first."""
    return [OUTPUT_NAME, MAP_OUTPUT_NAME] if has_map(model) else [OUTPUT_NAME]


def logit_view(model: Any) -> Any:
    """The same weights as a model whose output is the logit map (training); ``None`` for the seed."""
    import keras

    if not has_map(model):
        return None
    return keras.Model(model.inputs, model.get_layer(LOGIT_MAP_LAYER).output, name=f"{model.name}_logits")
