"""ONNX export (tf2onnx), the ONNX-vs-TensorFlow check, and the model card beside the .onnx.

``tf2onnx.convert.from_keras`` fails on Keras 3 models, so the model is wrapped
in a ``tf.function`` with an explicit, named input signature (dynamic batch)
and converted with ``from_function``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import ExportError
from training.models import INPUT_NAME, output_names

logger = logging.getLogger(__name__)

CARD_SUFFIX = ".card.json"


def card_path(model_path: Path) -> Path:
    """``x/model.onnx`` -> ``x/model.card.json`` (the node's naming)."""
    return model_path.with_name(model_path.stem + CARD_SUFFIX)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_onnx(model: Any, path: Path, *, size: int, channels: int, opset: int = 17) -> dict[str, Any]:
    """Convert ``model`` to ONNX at ``path``: input ``slices`` [N, size, size, channels].

    Outputs, in this order: ``p_malignant`` [N, 1] and, for a model with a map,
    ``score_map`` [N, h, w, 1]. Returns {"seconds", "bytes", "outputs": {name: shape}}.
    """
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec([None, size, size, channels], tf.float32, name=INPUT_NAME),)
    names = output_names(model)

    @tf.function(input_signature=spec)
    def serve(slices: Any) -> dict[str, Any]:
        out = model(slices, training=False)
        out = out if isinstance(out, (list, tuple)) else [out]
        return dict(zip(names, out))

    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset, output_path=str(path))
    except Exception as exc:  # tf2onnx raises many kinds; name the step
        raise ExportError(f"tf2onnx conversion to {path} failed: {exc}") from exc
    seconds = time.perf_counter() - start
    shapes = output_shapes(path)
    if list(shapes) != names:
        raise ExportError(f"{path}: graph outputs {list(shapes)}, expected {names} (slice probability first)")
    logger.info("exported %s (opset %d, %.1f MB, outputs %s) in %.1f s", path, opset, path.stat().st_size / 1e6,
                shapes, seconds)
    return {"seconds": round(seconds, 2), "bytes": path.stat().st_size, "outputs": shapes}


def output_shapes(path: Path) -> dict[str, list[Any]]:
    """The graph's outputs in order, name -> shape (None for a symbolic dimension)."""
    import onnx

    return {o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
            for o in onnx.load(str(path)).graph.output}


def _empty(shape: Any) -> np.ndarray:
    """A batch of 0 rows of an ONNX Runtime input or output's shape (its first dimension dropped)."""
    return np.zeros((0,) + tuple(d if isinstance(d, int) else 0 for d in shape[1:]), dtype=np.float32)


def onnx_session(path: Path) -> Any:
    """An onnxruntime CPU session for ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_outputs(session: Any, x: np.ndarray, batch: int = 64, *, input_name: str | None = None,
                 output_names: list[str] | None = None) -> list[np.ndarray]:
    """Outputs (default: all) of the session for every row of ``x`` fed to ``input_name`` (default: the first
    input), in batches, concatenated. A graph's other inputs (a two-stage graph's) get empty batches."""
    inputs = session.get_inputs()
    name = input_name or inputs[0].name
    empty = {i.name: _empty(i.shape) for i in inputs if i.name != name}
    wanted = output_names or [o.name for o in session.get_outputs()]
    parts = [session.run(wanted, {name: x[i : i + batch], **empty}) for i in range(0, len(x), batch)]
    if not parts:
        shapes = {o.name: o.shape for o in session.get_outputs()}
        return [_empty(shapes[n]) for n in wanted]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def onnx_predict(session: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """P(malignant) for every row of ``x`` (n,), in batches."""
    return onnx_outputs(session, x, batch)[0][:, 0]


def tf_outputs(model: Any, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """Every output of the Keras model for ``x`` (a list even for one output)."""
    out = model.predict(x, batch_size=batch, verbose=0)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def parity(model: Any, path: Path, x: np.ndarray, tolerance: float) -> dict[str, Any]:
    """Max |ONNX - TensorFlow| over ``x``, per output; ExportError if any is above ``tolerance``."""
    names = output_names(model)
    tf_out = tf_outputs(model, x)
    onnx_out = onnx_outputs(onnx_session(path), x)
    per = {n: float(np.max(np.abs(a - b))) if len(x) else 0.0 for n, a, b in zip(names, tf_out, onnx_out)}
    delta = max(per.values())
    result = {"max_abs_diff": delta, "max_abs_diff_per_output": per, "n_inputs": int(len(x)),
              "tolerance": tolerance, "passed": delta <= tolerance}
    logger.info("ONNX vs TensorFlow on %d held-out slices: max |diff| %s (tolerance %.0e)", len(x),
                {k: f"{v:.3g}" for k, v in per.items()}, tolerance)
    if delta > tolerance:
        raise ExportError(f"{path}: ONNX output differs from TensorFlow by {delta:.3g} > {tolerance:.0e} ({per})")
    return result


def library_versions() -> dict[str, str]:
    """Versions of the libraries that made the model."""
    import importlib.metadata as md

    out = {}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def write_card(model_path: Path, fields: dict[str, Any]) -> Path:
    """Write the card JSON beside ``model_path`` with the file's sha256 (keys as ``node.model_card.ModelCard``)."""
    card = dict(fields, sha256=sha256_of(model_path))
    path = card_path(model_path)
    path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return path


def install(model_path: Path, dest_dir: Path) -> Path:
    """Copy the .onnx and its card into ``dest_dir`` (card last, so a reader never sees a card without its model)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / model_path.name
    shutil.copyfile(model_path, target)
    shutil.copyfile(card_path(model_path), card_path(target))
    return target
