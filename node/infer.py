"""Run the lung-CT CNN on a HU volume with ONNX Runtime: one session, slices in batches.

The worker builds one :class:`Model` at start (the session, and a CUDA context
when there is one, stay loaded for every job) and calls :meth:`Model.analyse`
per study. A model is refused unless its card (``model.card.json`` beside
``model.onnx``) matches the file, this node's preprocessing and the graph's
input and output.

This is the worker's module: it imports onnxruntime. The receive path
(receive, store, completion, enqueue, serve, cli) must never import it.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from node.config import DEVICES
from node.model_card import BUNDLED_MODEL_NAME, bundled_model_path, resolve_model_path  # noqa: F401 (re-exported)
from node.errors import ModelError
from node.model_card import Classifier, ModelCard
from node.preprocessing import (
    PREPROCESSING_VERSION,
    Peak,
    locate_peaks,
    prepare_slices,
    score_candidates,
    slice_scores_of,
)

logger = logging.getLogger(__name__)

#: The file name of the model that ships with ainode, in ``node/models/``.

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

#: ORT log severity: 3 = errors and fatal only.
_ORT_LOG_SEVERITY = 3

_TOPK_MEAN = re.compile(r"top(\d+)_mean")


def aggregate(slice_scores: np.ndarray, method: str) -> float:
    """The study score from the per-slice probabilities.

    Methods
    -------
    ``"top3_mean"`` (the default, the one the test model's card names)
        Mean of the 3 highest slice probabilities (``"topK_mean"`` for any K).
        A nodule occupies a few slices of a study of dozens to hundreds, so a
        mean over all slices dilutes it by the study's length; the single
        highest slice is noisy (one artefact decides). The mean of the top k
        is the usual compromise (multiple-instance learning pooling). With
        fewer than K slices it is the mean of all of them.
    ``"max"``
        The highest slice probability.
    ``"mean"``
        Mean over all slices (for comparison; dilutes small findings).

    Raises ValueError for an unknown method or no scores.
    """
    scores = np.asarray(slice_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError('Argument "slice_scores" must not be empty')
    if method == "max":
        return float(scores.max())
    if method == "mean":
        return float(scores.mean())
    match = _TOPK_MEAN.fullmatch(method)
    if match and int(match.group(1)) >= 1:
        k = min(int(match.group(1)), scores.size)
        return float(np.partition(scores, scores.size - k)[scores.size - k :].mean())
    raise ValueError(f'Argument "method" must be "max", "mean" or "topK_mean" (K >= 1), got {method!r}')


def top_slices(slice_scores: np.ndarray, k: int, ties: np.ndarray | None = None) -> tuple[int, ...]:
    """Indices of the ``k`` highest scores, best first (ties: the higher of ``ties``, then lower index first)."""
    if k < 1:
        raise ValueError(f'Argument "k" must be at least 1, got {k}')
    scores = np.asarray(slice_scores, dtype=np.float64)
    if ties is None:
        order = np.argsort(-scores, kind="stable")
    else:
        order = np.lexsort((np.arange(scores.size), -np.asarray(ties, dtype=np.float64), -scores))
    return tuple(int(i) for i in order[:k])


#: Peaks closer than this (mm, 3-D) to a stronger one are the same finding (non-maximum suppression).
FINDING_DISTANCE_MM = 15.0


@dataclass(frozen=True, eq=False)  # eq=False: the ndarray field makes == ambiguous
class Analysis:
    """The result of one volume: study score, slice scores, key slices, located peaks and how fast it ran."""

    score: float  # study probability, aggregated from slice_scores
    slice_scores: np.ndarray  # float32 (z,), one probability per slice of the volume
    key_slices: tuple[int, ...]  # z indices of the top slices, best first
    aggregation: str  # the method that made score from slice_scores
    providers: tuple[str, ...]  # ONNX Runtime execution providers the session used
    seconds: float  # preprocessing + inference, wall clock
    slices_per_second: float
    peaks: tuple[Peak, ...] = ()  # the most suspicious places, best first, in source pixels (score map only)
    located: bool = False  # the model has a score map: peaks are real; without one there are none
    locate_seconds: float = 0.0  # of ``seconds``: reading the maps into peaks (and, two-stage, scoring them)
    detector_score: float | None = None  # two-stage: the first stage's own study score, for the record


def _providers_for(device: str, available: list[str]) -> list[str]:
    """CUDA first (CPU runs the nodes CUDA lacks) when asked for and offered, else CPU only."""
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def _session_options(intra_op_threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = _ORT_LOG_SEVERITY
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    return options


def _dims_match(graph_dims: list[Any], card_dims: list[Any]) -> bool:
    """Same rank, and every dimension fixed on both sides is equal (symbolic ones pass)."""
    if len(graph_dims) != len(card_dims):
        return False
    return all(not (isinstance(g, int) and isinstance(c, int)) or g == c for g, c in zip(graph_dims, card_dims))


class Model:
    """An ONNX model and its card, checked, with one loaded ONNX Runtime session.

    Parameters
    ----------
    path
        The ``.onnx`` file; its card is ``<stem>.card.json`` beside it.
    device
        ``"auto"`` (CUDA when onnxruntime offers it, else CPU), ``"cpu"``, or
        ``"cuda"`` (ModelError unless the session really runs on CUDA).
    intra_op_threads
        Threads per operator; None lets ONNX Runtime decide (one per physical core).

    Raises ModelError if the file or card is missing, they do not match each
    other, this node's preprocessing or the graph, or the device is unusable.
    """

    def __init__(self, path: Path, device: str = "auto", *, intra_op_threads: int | None = None) -> None:
        if device not in DEVICES:
            raise ValueError(f'Argument "device" must be one of {", ".join(DEVICES)}, got {device!r}')
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ValueError(f'Argument "intra_op_threads" must be at least 1, got {intra_op_threads}')
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file {path} not found")
        self.path = path
        self.card: ModelCard = ModelCard.read(path)
        self.card.check(path, PREPROCESSING_VERSION)
        try:
            aggregate(np.zeros(1, dtype=np.float32), self.card.aggregation)
        except ValueError:
            raise ModelError(f"{path}: card names unknown aggregation {self.card.aggregation!r}") from None

        available = ort.get_available_providers()
        if device == "cuda" and CUDA not in available:
            raise ModelError(
                f"model.device = cuda but CUDA is not usable: onnxruntime {ort.__version__} offers only "
                f"{', '.join(available)} (install the gpu extra, onnxruntime-gpu, instead of cpu)"
            )
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=_session_options(intra_op_threads), providers=_providers_for(device, available)
            )
        except Exception as exc:  # onnxruntime raises its own, unrelated exception classes
            raise ModelError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
        self.providers: list[str] = list(self._session.get_providers())
        if CUDA in available and CUDA not in self.providers:
            why = f"onnxruntime {ort.__version__} has {CUDA} but it did not start (no GPU visible, or CUDA/cuDNN libraries missing)"
            if device == "cuda":
                raise ModelError(f"model.device = cuda but CUDA is not usable: {why}; the session got {', '.join(self.providers)}")
            if device == "auto":
                logger.warning("Model %s: %s; running on CPU", path.name, why)

        self.classifier: Classifier | None = self.card.second_stage(path)
        self.input_name, self.output_name = self._check_graph()
        self.map_name: str | None = self.card.map_output_name or None
        logger.info(
            "Model %s %s (%s): ONNX Runtime %s, providers %s",
            self.card.name, self.card.version, path, ort.__version__, ", ".join(self.providers),
        )

    def _check_graph(self) -> tuple[str, str]:
        """The graph's input and output names, after checking them and the input shape against the card."""
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        wanted = 2 if self.classifier else 1
        if len(inputs) != wanted or len(outputs) < 1:
            raise ModelError(f"{self.path}: model must have {wanted} input(s) and an output, has {len(inputs)} and {len(outputs)}")
        if self.classifier:
            self._check_classifier(inputs[1], outputs)
        graph_in, graph_out = inputs[0], outputs[0]
        if graph_in.name != self.card.input_name:
            raise ModelError(f"{self.path}: input name {graph_in.name!r} does not match its card ({self.card.input_name!r})")
        if graph_out.name != self.card.output_name:
            raise ModelError(f"{self.path}: output name {graph_out.name!r} does not match its card ({self.card.output_name!r})")
        if self.card.map_output_name:
            maps = [o for o in outputs if o.name == self.card.map_output_name]
            if not maps:
                raise ModelError(f"{self.path}: card names score map {self.card.map_output_name!r}, which the graph "
                                 f"does not output (outputs: {', '.join(o.name for o in outputs)})")
            if len(maps[0].shape) != 4:
                raise ModelError(f"{self.path}: score map {maps[0].name!r} has shape {maps[0].shape}, expected [N, h, w, 1]")
        if graph_in.type != "tensor(float)":
            raise ModelError(f"{self.path}: input type {graph_in.type} is not tensor(float)")
        if not _dims_match(list(graph_in.shape), list(self.card.input_shape)):
            raise ModelError(f"{self.path}: input shape {graph_in.shape} does not match its card ({self.card.input_shape})")
        return graph_in.name, graph_out.name

    def _check_classifier(self, graph_in: Any, outputs: list[Any]) -> None:
        c = self.classifier
        assert c is not None
        if graph_in.name != c.input_name:
            raise ModelError(f"{self.path}: second input {graph_in.name!r} does not match its card's classifier ({c.input_name!r})")
        if not _dims_match(list(graph_in.shape), [None, c.size, c.size, c.channels]):
            raise ModelError(f"{self.path}: classifier input shape {graph_in.shape} does not match its card "
                             f"([N, {c.size}, {c.size}, {c.channels}])")
        if c.output_name not in [o.name for o in outputs]:
            raise ModelError(f"{self.path}: card names classifier output {c.output_name!r}, which the graph does not "
                             f"output (outputs: {', '.join(o.name for o in outputs)})")

    def _feeds(self, slices: np.ndarray | None = None, patches: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The graph's inputs: a two-stage graph takes both, so the stage not run gets an empty batch."""
        size, channels = self.card.size, 2 * self.card.context + 1
        feeds = {self.input_name: slices if slices is not None else np.zeros((0, size, size, channels), np.float32)}
        if self.classifier:
            c = self.classifier
            feeds[c.input_name] = patches if patches is not None else np.zeros((0, c.size, c.size, c.channels), np.float32)
        return feeds

    def classify(self, volume_hu: np.ndarray, candidates: list[Peak], spacing: tuple[float, float, float],
                 batch_size: int = 64) -> list[Peak]:
        """The ``candidates`` of a (z, y, x) HU volume with the second stage's probabilities, best first."""
        c = self.classifier
        if c is None:
            raise ModelError(f"{self.path}: the model has no classifier")

        def score(patches: np.ndarray) -> np.ndarray:
            (out,) = self._session.run([c.output_name], self._feeds(patches=patches))
            out = np.asarray(out, dtype=np.float32).reshape(-1)
            if out.size != len(patches):
                raise ModelError(f"{self.path}: classifier output of {out.size} for {len(patches)} patches")
            _check_probabilities(self.path, "classifier output", out)
            return out

        return score_candidates(volume_hu, candidates, score, spacing=spacing, size=c.size, mm_per_pixel=c.mm_per_pixel,
                                z_offsets_mm=c.z_offsets_mm, windows=c.windows, search_mm=c.search_mm,
                                min_distance_mm=c.min_distance_mm, batch_size=batch_size)

    def score_slices(self, volume_hu: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """One probability per slice of a (z, y, x) HU volume, float32 (z,)."""
        return self.run(volume_hu, batch_size=batch_size, with_maps=False)[0]

    def run(
        self, volume_hu: np.ndarray, batch_size: int = 32, *, with_maps: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Slice probabilities (z,) and, when the model has one, its score maps (z, h, w), both float32.

        Slices are preprocessed and run ``batch_size`` at a time, so memory
        beyond the volume itself (and the small maps) stays bounded by the batch.
        """
        if volume_hu.ndim != 3 or volume_hu.shape[0] == 0:
            raise ValueError(f'Argument "volume_hu" must have shape (z, y, x) with z >= 1, got {volume_hu.shape}')
        if batch_size < 1:
            raise ValueError(f'Argument "batch_size" must be at least 1, got {batch_size}')
        depth = volume_hu.shape[0]
        hu_window = (float(self.card.window[0]), float(self.card.window[1]))
        names = [self.output_name] + ([self.map_name] if with_maps and self.map_name else [])
        scores = np.empty(depth, dtype=np.float32)
        maps: np.ndarray | None = None
        for start in range(0, depth, batch_size):
            stop = min(start + batch_size, depth)
            batch = prepare_slices(
                volume_hu, range(start, stop), size=self.card.size, context=self.card.context, hu_window=hu_window
            )
            outs = self._session.run(names, self._feeds(slices=batch))
            out = np.asarray(outs[0])
            if out.size != stop - start:
                raise ModelError(f"{self.path}: output shape {out.shape} for a batch of {stop - start}: expected one score per slice")
            scores[start:stop] = out.reshape(-1)
            if len(outs) > 1:
                m = np.asarray(outs[1], dtype=np.float32)
                if m.ndim != 4 or m.shape[0] != stop - start or m.shape[-1] != 1:
                    raise ModelError(f"{self.path}: score map shape {m.shape} for a batch of {stop - start}: expected [N, h, w, 1]")
                if maps is None:
                    maps = np.empty((depth, m.shape[1], m.shape[2]), dtype=np.float32)
                maps[start:stop] = m[..., 0]
        _check_probabilities(self.path, "model output", scores)
        if maps is not None:
            _check_probabilities(self.path, "score map", maps)
        return scores, maps

    def analyse(
        self,
        volume_hu: np.ndarray,
        *,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        top_k: int = 3,
        max_peaks: int = 3,
        batch_size: int = 32,
    ) -> Analysis:
        """Score a (z, y, x) HU volume: study score by the card's aggregation, its ``top_k`` key slices,
        and, with a score map, its ``max_peaks`` most suspicious places (``spacing``: (z, row, column) mm)."""
        if top_k < 1:
            raise ValueError(f'Argument "top_k" must be at least 1, got {top_k}')
        started = time.perf_counter()
        slice_scores, maps = self.run(volume_hu, batch_size=batch_size)
        peaks: list[Peak] = []
        inferred = time.perf_counter()
        detector_score, ties = None, None
        source_shape = (volume_hu.shape[1], volume_hu.shape[2])
        if maps is not None and self.classifier is not None:
            c = self.classifier
            candidates = locate_peaks(maps, source_shape=source_shape, size=self.card.size, spacing=spacing,
                                      min_probability=0.0, max_peaks=c.candidates, min_distance_mm=c.min_distance_mm)
            detector_score = aggregate(slice_scores, self.card.aggregation)
            peaks = self.classify(volume_hu, candidates, spacing)
            ties = slice_scores  # the key slices after the candidates' own: the detector's best
            slice_scores = slice_scores_of(peaks, volume_hu.shape[0])
            peaks = peaks[:max_peaks]
        elif maps is not None:
            peaks = locate_peaks(maps, source_shape=source_shape, size=self.card.size, spacing=spacing,
                                 min_probability=0.0, max_peaks=max_peaks, min_distance_mm=FINDING_DISTANCE_MM)
        seconds = time.perf_counter() - started
        slice_scores.flags.writeable = False
        return Analysis(
            score=aggregate(slice_scores, self.card.aggregation),
            slice_scores=slice_scores,
            key_slices=top_slices(slice_scores, top_k, ties),
            aggregation=self.card.aggregation,
            providers=tuple(self.providers),
            seconds=seconds,
            slices_per_second=len(slice_scores) / seconds if seconds > 0 else float("inf"),
            peaks=tuple(peaks),
            located=maps is not None,
            locate_seconds=time.perf_counter() - inferred,
            detector_score=detector_score,
        )


def _check_probabilities(path: Path, what: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise ModelError(f"{path}: {what} is not a probability in [0, 1]")
