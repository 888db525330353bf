"""A small, real ONNX CNN with a model card, for tests and benchmarks until a trained model exists.

The graph has the trained model's interface (NHWC float32 ``[N, size, size,
2 * context + 1]`` in, ``[N, 1]`` probability out) and runs in a real ONNX
Runtime session:

    input -> Transpose (NCHW) -> Conv 3x3, 8 filters, pad 1 -> Relu
          -> GlobalMaxPool -> Flatten -> Gemm (8 -> 1) -> Sigmoid -> output
                                  Relu -> Conv 1x1 (the Gemm's weights) -> Sigmoid -> NHWC -> score map

The score map (``[N, size, size, 1]``, named in the card as ``map_output_name``)
is the same linear read-out applied at every location, so it peaks where the
blob filter fires; ``with_map=False`` builds the model without it.

Seven filters have weights from a seeded RNG (each scaled to an L1 norm of 1)
and small output weights. The eighth is hand-made, a "bright blob" detector:
a 3x3 mean over the slice (weight 1/2) and its neighbours (1/2 shared),
minus the level of -400 HU in the card's window, so it fires only where a
neighbourhood is denser than aerated lung (-800 HU): a solid nodule, but
equally the chest wall, mediastinum and vessels. Max pooling keeps its
strongest response anywhere in the slice and the Gemm gives it a large
weight, so a slice with a bright round spot scores well above one of lung
parenchyma only (about 0.12 for -800 HU lung; 0.74 to 0.98 on the slices of
a +40 HU disc, with context 1).
It is NOT a nodule detector and its scores mean nothing clinically.

Needs the ``onnx`` package (in the ``training`` and ``dev`` extras).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from node.model_card import ModelCard, sha256_of
from node.preprocessing import LUNG_WINDOW, PREPROCESSING_VERSION, SOFT_TISSUE_WINDOW, window

OPSET = 17
IR_VERSION = 8  # the lowest IR for opset 17, so older onnxruntime releases load it too
INPUT_NAME = "input"
OUTPUT_NAME = "probability"
MAP_NAME = "score_map"

RANDOM_FILTERS = 7
#: The blob filter fires where the weighted 3x3 mean is denser than this (HU).
BLOB_LEVEL_HU = -400.0
BLOB_WEIGHT = 20.0  # Gemm weight of the blob feature (logit per window unit above the level)
RANDOM_WEIGHT = 0.1  # bound of the Gemm weights of the random features
BIAS = -2.0  # logit with no blob and no random response: sigmoid(-2) = 0.12


def _blob_filter(channels: int, level: float) -> tuple[np.ndarray, float]:
    """Weights (channels, 3, 3) and bias of the bright-blob filter."""
    context = channels // 2
    per_channel = np.full(channels, 0.5 / (2 * context), dtype=np.float32) if context else np.ones(1, np.float32)
    per_channel[context] = 0.5 if context else 1.0
    weights = np.repeat(per_channel[:, None, None] / 9.0, 3, axis=1).repeat(3, axis=2)
    return weights.astype(np.float32), -level


PATCH_NAME = "patches"
CANDIDATE_NAME = "p_candidate"
PATCH_SIZE = 16
#: The test classifier's card entry (node.model_card.Classifier): planes -5, 0, +5 mm, lung and soft-tissue windows.
CLASSIFIER = {"input_name": PATCH_NAME, "output_name": CANDIDATE_NAME, "size": PATCH_SIZE, "mm_per_pixel": 1.0,
              "z_offsets_mm": [-5.0, 0.0, 5.0], "windows": [list(LUNG_WINDOW), list(SOFT_TISSUE_WINDOW)],
              "candidates": 8, "min_distance_mm": 15.0}
PATCH_CHANNELS = 6
CENTRE_SOFT_CHANNEL = 3  # plane 0 mm, soft-tissue window


def _add_classifier(nodes: list, inputs: list, outputs: list, initializers: list) -> None:
    """patches -> centre plane's soft-tissue channel -> spatial mean -> 8 x - 2 -> sigmoid -> p_candidate [N, 1]."""
    initializers += [
        numpy_helper.from_array(np.array([CENTRE_SOFT_CHANNEL], np.int64), "cls_start"),
        numpy_helper.from_array(np.array([CENTRE_SOFT_CHANNEL + 1], np.int64), "cls_end"),
        numpy_helper.from_array(np.array([3], np.int64), "cls_axis"),
        numpy_helper.from_array(np.array(8.0, np.float32), "cls_w"),
        numpy_helper.from_array(np.array(-2.0, np.float32), "cls_b"),
    ]
    nodes += [
        helper.make_node("Slice", [PATCH_NAME, "cls_start", "cls_end", "cls_axis"], ["cls_soft"]),
        helper.make_node("ReduceMean", ["cls_soft"], ["cls_mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["cls_mean"], ["cls_flat"], axis=1),
        helper.make_node("Mul", ["cls_flat", "cls_w"], ["cls_scaled"]),
        helper.make_node("Add", ["cls_scaled", "cls_b"], ["cls_logit"]),
        helper.make_node("Sigmoid", ["cls_logit"], [CANDIDATE_NAME]),
    ]
    inputs.append(helper.make_tensor_value_info(PATCH_NAME, TensorProto.FLOAT, ["M", PATCH_SIZE, PATCH_SIZE, PATCH_CHANNELS]))
    outputs.append(helper.make_tensor_value_info(CANDIDATE_NAME, TensorProto.FLOAT, ["M", 1]))


def build_test_model(
    path: Path, *, size: int = 64, context: int = 1, seed: int = 0, name: str = "ainode-test-cnn",
    with_map: bool = True, with_classifier: bool = False,
) -> ModelCard:
    """Write a small real CNN to ``path`` (ONNX, opset 17) and its card beside it; return the card.

    ``with_classifier``: a second stage beside it (input ``patches``, output
    ``p_candidate``, the card's ``classifier``, aggregation ``max``): the
    sigmoid of the mean soft-tissue-window value of a patch's centre plane,
    so a patch on something dense scores higher than one on lung. Not a
    classifier of anything.
    """
    if with_classifier and not with_map:
        raise ValueError("a classifier scores the map's candidates: with_classifier needs with_map")
    if size < 3:
        raise ValueError(f'Argument "size" must be at least 3, got {size}')
    if context < 0:
        raise ValueError(f'Argument "context" must be 0 or more, got {context}')
    path = Path(path)
    channels = 2 * context + 1
    rng = np.random.default_rng(seed)

    random_w = rng.normal(size=(RANDOM_FILTERS, channels, 3, 3)).astype(np.float32)
    random_w /= np.abs(random_w).sum(axis=(1, 2, 3), keepdims=True)
    level = float(window(np.array([BLOB_LEVEL_HU]), *LUNG_WINDOW)[0])
    blob_w, blob_b = _blob_filter(channels, level)
    conv_w = np.concatenate([random_w, blob_w[None]], axis=0)
    conv_b = np.zeros(RANDOM_FILTERS + 1, dtype=np.float32)
    conv_b[-1] = blob_b
    gemm_w = np.concatenate(
        [rng.uniform(-RANDOM_WEIGHT, RANDOM_WEIGHT, RANDOM_FILTERS), [BLOB_WEIGHT]]
    ).astype(np.float32)[None, :]
    gemm_b = np.array([BIAS], dtype=np.float32)

    initializers = [
        numpy_helper.from_array(conv_w, "conv_w"),
        numpy_helper.from_array(conv_b, "conv_b"),
        numpy_helper.from_array(gemm_w, "dense_w"),
        numpy_helper.from_array(gemm_b, "dense_b"),
    ]
    nodes = [
        helper.make_node("Transpose", [INPUT_NAME], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalMaxPool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "dense_w", "dense_b"], ["logit"], transB=1),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT_NAME]),
    ]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])]
    if with_map:
        initializers += [
            numpy_helper.from_array(gemm_w.reshape(1, -1, 1, 1), "map_w"),
            numpy_helper.from_array(gemm_b, "map_b"),
        ]
        nodes += [
            helper.make_node("Conv", ["relu", "map_w", "map_b"], ["map_logit"], kernel_shape=[1, 1]),
            helper.make_node("Sigmoid", ["map_logit"], ["map_nchw"]),
            helper.make_node("Transpose", ["map_nchw"], [MAP_NAME], perm=[0, 2, 3, 1]),
        ]
        outputs.append(helper.make_tensor_value_info(MAP_NAME, TensorProto.FLOAT, ["N", size, size, 1]))
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", size, size, channels])]
    if with_classifier:
        _add_classifier(nodes, inputs, outputs, initializers)
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="ainode.testmodel"
    )
    model.doc_string = "Hand-built test CNN (seeded random filters + a bright-blob filter); not a trained model."
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))

    card = ModelCard(
        name=name,
        version=f"test-seed{seed}",
        sha256=sha256_of(path),
        input_name=INPUT_NAME,
        input_shape=[None, size, size, channels],
        output_name=OUTPUT_NAME,
        map_output_name=MAP_NAME if with_map else "",
        preprocessing_version=PREPROCESSING_VERSION,
        size=size,
        context=context,
        window=[LUNG_WINDOW[0], LUNG_WINDOW[1]],
        threshold=0.5,
        threshold_method="fixed (test model)",
        aggregation="max" if with_classifier else "top3_mean",
        classifier=CLASSIFIER if with_classifier else {},
        intended_use="tests only",
        training_data="none: a hand-built test graph, not a trained model",
        seed=seed,
        created=_dt.date.today().isoformat(),
        versions={"onnx": onnx.__version__},
    )
    card.write(path)
    return card
