"""LiteRT (TFLite) export: the classifier as one `.tflite` file for phones and boards.

The file takes raw pixels, float32 0-255 [batch, size, size, 3] at the model's own size, with
the backbone's preprocessing inside, and returns probabilities [batch, classes] in the order
of `labels.txt`, written beside it (a binary model's one sigmoid unit becomes two columns, as
in the SavedModel). The file carries its class names too, in a `kerastl` metadata entry (JSON:
the kerastl version, the image size and the labels), which is how `load_litert` tells a
kerastl export from another model.

Keras converts the model (`keras.Model.export(format="litert")`), restricted to TFLite's
built-in ops, so that LiteRT's own interpreter runs the file with no TensorFlow. `quantize`:

- "none": float32 throughout;
- "float16": float16 weights, half the size, float32 arithmetic;
- "dynamic": int8 weights, activations quantized on the fly;
- "int8": int8 weights and activations, calibrated on a representative set of training
  images; an op without an int8 kernel stays float32 (`LiteExport.float_ops` names them).
  Input and output stay float32 in every variant.

Writing and reading need `ai-edge-litert` (the `lite` extra): its interpreter runs the files
and its flatbuffer tools write and read the metadata.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from kerastl.choices import QUANTIZE
from kerastl.errors import KerastlError
from kerastl.models.classifier import TransferClassifier
from kerastl.models.export import (
    LABELS_FILE,
    ExportedModel,
    both_classes,
    load_export,
    read_image_files,
    read_labels,
    top_k,
    write_labels,
)
from kerastl.storage import replace_file
from kerastl.version import __version__

log = logging.getLogger(__name__)

LITE_FILE = "model.tflite"
REPRESENTATIVE_IMAGES = 200  # int8 calibration: TensorFlow's guide suggests 100-500 samples
METADATA_NAME = "kerastl"


@dataclass
class LiteExport:
    """What `export_litert` wrote: the file, its quantization and size, and for int8 the ops that
    stayed float32 (no int8 kernel), as "NAME xCOUNT"."""

    path: Path
    quantize: str
    size_bytes: int
    float_ops: list[str] = field(default_factory=list)


def _tools() -> tuple[Any, Any, Any]:
    """LiteRT's interpreter class, flatbuffer tools and schema; one line saying how to install them."""
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.interpreter import Interpreter
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:
        raise KerastlError("LiteRT files need LiteRT's own tools: pip install 'kerastl[lite]' (ai-edge-litert)") \
            from None
    return Interpreter, flatbuffer_utils, schema


def check_quantize(quantize: str) -> None:
    """One line for a `quantize` value that is not one of `QUANTIZE`."""
    if quantize not in QUANTIZE:
        raise KerastlError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")


def _probabilities_model(model: TransferClassifier) -> keras.Model:
    """The classifier with two probability columns when it has one sigmoid unit."""
    if model.output_shape[-1] != 1:
        return model
    return keras.Model(model.inputs, both_classes(model.outputs[0]), name=f"{model.name}_two_columns")


def export_litert(model: TransferClassifier, path: str | os.PathLike, class_names: Sequence[str],
                  quantize: str = "none", representative: np.ndarray | None = None) -> LiteExport:
    """Writes `model` as a LiteRT file at `path` (replaced whole, never half-written), with
    `labels.txt` beside it.

    Args:
        model: a `TransferClassifier`.
        path: the `.tflite` file.
        class_names: names in output order.
        quantize: one of `QUANTIZE` (see the module docstring).
        representative: uint8 or float 0-255 training images [n, size, size, 3] for int8's
            calibration; at most `REPRESENTATIVE_IMAGES` are used.
    """
    check_quantize(quantize)
    if quantize == "int8" and (representative is None or len(representative) == 0):
        raise KerastlError("int8 quantization calibrates on training images, and none were given: pass the "
                           "images the model trained on (--data), or choose --quantize dynamic")
    path = Path(path)
    if path.suffix != ".tflite":
        raise KerastlError(f"a LiteRT file ends in .tflite, got {path}")
    classes = max(model.output_shape[-1], 2)
    if len(class_names) != classes:
        raise KerastlError(f"{len(class_names)} class names for a model with {classes} outputs")
    if (path.parent / LABELS_FILE).is_file() and read_labels(path.parent) != list(class_names):
        raise KerastlError(f"{path.parent / LABELS_FILE} holds another model's class names: write the file into "
                           "another folder")
    _tools()  # before converting: writing the metadata needs them
    size = model.image_size
    spec = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}
    options: dict[str, Any] = {"target_spec": spec}
    if quantize != "none":
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        spec["supported_types"] = [tf.float16]
    if quantize == "int8":
        images = np.asarray(representative[:REPRESENTATIVE_IMAGES], np.float32)
        images = tf.image.resize(images, (size, size)).numpy() if images.shape[1:3] != (size, size) else images
        options["representative_dataset"] = lambda: ([image[None]] for image in images)
        spec["supported_ops"] = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    signature = [tf.TensorSpec([None, size, size, 3], tf.float32, name="images")]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        def write(out: Path) -> None:
            _probabilities_model(model).export(str(out), format="litert", verbose=False, input_signature=signature,
                                               **options)
            _stamp(out, {"kerastl_version": __version__, "image_size": size, "labels": list(class_names)})

        replace_file(path, write, suffix=".tflite")
    except Exception as error:  # TensorFlow's converter reports an op outside TFLite's built-ins this way
        if isinstance(error, KerastlError):
            raise
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise KerastlError(f"cannot convert the model to LiteRT: {lines[-1] if lines else type(error).__name__}") \
            from None
    write_labels(path.parent, class_names)
    floats = float_ops(path) if quantize == "int8" else []
    if floats:
        log.warning("int8: these ops have no int8 kernel and stayed float32: %s", ", ".join(floats))
    log.debug("wrote %s (%s, %.1f MB)", path, quantize, path.stat().st_size / 2**20)
    return LiteExport(path, quantize, path.stat().st_size, floats)


def _stamp(path: Path, values: dict[str, Any]) -> None:
    """Adds the `kerastl` metadata entry (JSON `values`) to the LiteRT file at `path`."""
    _, flatbuffer_utils, schema = _tools()
    model = flatbuffer_utils.read_model(str(path))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(values).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    flatbuffer_utils.write_model(model, str(path))


def read_stamp(path: str | os.PathLike) -> dict[str, Any]:
    """The `kerastl` metadata of a LiteRT file (see `export_litert`), read in place from the flatbuffer
    (nothing else of the model is unpacked). A file that is not a LiteRT model, or has no such entry
    (kerastl did not write it), is a `KerastlError`."""
    _, _, schema = _tools()
    data = Path(path).read_bytes()
    try:
        if not schema.Model.ModelBufferHasIdentifier(data, 0):
            raise ValueError("no TFLite file identifier")
        model = schema.Model.GetRootAs(data, 0)
        entries = [model.Metadata(i) for i in range(model.MetadataLength())]
        found = [entry.Buffer() for entry in entries if entry.Name() == METADATA_NAME.encode()]
        stamp = json.loads(model.Buffers(found[0]).DataAsNumpy().tobytes()) if found else None
    except Exception as error:  # a damaged flatbuffer fails however its bad offsets lead the reader
        raise KerastlError(f"{path} is not a LiteRT model ({type(error).__name__})") from None
    if stamp is None:
        raise KerastlError(f"{path} is not a kerastl LiteRT export (it has no kerastl metadata); kerastl runs the "
                           "files that `kerastl export` writes")
    return stamp


def float_ops(path: str | os.PathLike) -> list[str]:
    """The ops of a LiteRT file that compute in float32, as "NAME xCOUNT" (the output's DEQUANTIZE aside)."""
    _, flatbuffer_utils, schema = _tools()
    model = flatbuffer_utils.read_model(str(path))
    counts: dict[str, int] = {}
    for graph in model.subgraphs:
        for op in graph.operators:
            name = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) or "?"
            if name != "DEQUANTIZE" and any(graph.tensors[i].type == schema.TensorType.FLOAT32
                                            for i in op.outputs if i >= 0):
                counts[name] = counts.get(name, 0) + 1
    return [f"{name} x{count}" for name, count in sorted(counts.items())]


@dataclass
class LiteModel:
    """A `.tflite` file written by `export_litert`, run by LiteRT's interpreter, with its class names."""

    path: Path
    class_names: list[str]
    image_size: int
    interpreter: Any  # ai_edge_litert.interpreter.Interpreter

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities for float 0-255 images [batch, height, width, 3] (resized to the file's size)."""
        images = np.asarray(images, np.float32)
        if images.shape[1:3] != (self.image_size, self.image_size):
            images = tf.image.resize(images, (self.image_size, self.image_size)).numpy()
        interpreter = self.interpreter
        (entry,), (exit_,) = interpreter.get_input_details(), interpreter.get_output_details()
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            if tuple(entry["shape"]) != batch.shape:
                interpreter.resize_tensor_input(entry["index"], list(batch.shape))
                interpreter.allocate_tensors()
                entry = interpreter.get_input_details()[0]
            interpreter.set_tensor(entry["index"], batch)
            interpreter.invoke()
            out.append(np.array(interpreter.get_tensor(exit_["index"])))
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    def predict_bytes(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Probabilities for encoded image files (JPEG, PNG, GIF, BMP), decoded as the SavedModel's
        `serve_bytes` decodes them; one that does not decode is a `KerastlError`."""
        images = []
        for data in encoded:
            try:
                image = tf.io.decode_image(data, channels=3, expand_animations=False)
            except tf.errors.InvalidArgumentError as error:
                raise KerastlError(f"cannot decode an image: {error.message.splitlines()[0]}") from None
            images.append(tf.image.resize(tf.cast(image, tf.float32), (self.image_size, self.image_size)).numpy())
        return self.predict(np.stack(images) if images else np.zeros((0, self.image_size, self.image_size, 3)))

    def predict_files(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Probabilities for image files on disk (see `kerastl.models.predict` for many files that may fail)."""
        return self.predict_bytes(read_image_files(paths))

    def top_k(self, probabilities: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """The k most probable (class name, probability) pairs for each row."""
        return top_k(probabilities, self.class_names, k)


def load_litert(path: str | os.PathLike) -> LiteModel:
    """A `.tflite` file written by `export_litert`, run by LiteRT's interpreter, with the class names
    its metadata carries. Refuses, with one line, a file LiteRT cannot read or one kerastl did not
    write (no `kerastl` metadata: another model may want other pixels than 0-255).
    """
    path = Path(path)
    if path.suffix != ".tflite" or not path.is_file():
        raise KerastlError(f"{path} is not a .tflite file")
    stamp = read_stamp(path)
    interpreter_class, _, _ = _tools()
    try:
        interpreter = interpreter_class(model_path=str(path))
    except (ValueError, RuntimeError) as error:
        raise KerastlError(f"{path} is not a LiteRT model: {str(error).splitlines()[0]}") from None
    interpreter.allocate_tensors()
    return LiteModel(path, list(stamp["labels"]), int(stamp["image_size"]), interpreter)


def load_exported(path: str | os.PathLike) -> ExportedModel | LiteModel:
    """What `kerastl predict` and `evaluate` run: a `.tflite` file (`load_litert`) or a SavedModel
    export folder (`kerastl.models.export.load_export`); both have `predict`, `predict_files`,
    `top_k` and `class_names`."""
    return load_litert(path) if Path(path).suffix == ".tflite" else load_export(path)
