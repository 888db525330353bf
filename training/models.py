"""The two architectures: ``seed`` (the baseline of the design) and ``default`` (ours).

Both take NHWC float32 slices in [0, 1] from ``node.preprocessing`` and output
P(malignant) per slice, shape (n, 1).
"""

from __future__ import annotations

from typing import Any

INPUT_NAME = "slices"
OUTPUT_NAME = "p_malignant"


def build_seed(size: int, channels: int) -> Any:
    """Conv2D 32/64/128 3x3 ReLU, each with 2x2 max-pool, Flatten, Dense 512, Dense 1 sigmoid.

    44.4 M parameters at 224 x 224 x 1 (almost all in the Dense 512 after Flatten).
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


def build_default(size: int | None, channels: int) -> Any:
    """Four Conv-BN-ReLU blocks (32/64/128/256, 2x2 max-pool), one more conv, and a max-pooled score map.

    A 1x1 conv turns the last feature map into a malignancy logit per location;
    global max pooling takes the most suspicious location, so the slice score is
    the score of its worst spot. Being fully convolutional, the network can
    train on patches (``size=None``) and run on whole slices with the same
    meaning. 0.98 M parameters whatever the input size.
    """
    import keras
    from keras import layers

    x = inp = keras.Input((size, size, channels), name=INPUT_NAME)
    for filters in (32, 64, 128, 256):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(256, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Conv2D(1, 1, name="logit_map")(x)
    x = layers.GlobalMaxPooling2D()(x)
    out = layers.Activation("sigmoid", name=OUTPUT_NAME)(x)
    return keras.Model(inp, out, name="default")


def build_model(arch: str, size: int | None, channels: int) -> Any:
    """The named architecture (``seed`` or ``default``); ``size=None``: any input size (``default`` only)."""
    builders = {"seed": build_seed, "default": build_default}
    if arch not in builders:
        raise ValueError(f'Argument "arch" must be one of {sorted(builders)}, got {arch!r}')
    return builders[arch](size, channels)
