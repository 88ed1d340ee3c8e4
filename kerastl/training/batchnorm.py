"""BatchNorm recalibration: a backbone's moving statistics set to a sample's, in bounded memory.

Keras BatchNorm momentum (0.99-0.999) leaves moving statistics far from the data
after short training from scratch, so a model that trained well evaluates badly.
Recalibration replaces them with statistics measured on a sample of un-augmented
training images, by PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm"; fvcore's `update_bn_stats`): the sample goes through the backbone in
training mode in chunks, with momentum 0, so after each chunk every BatchNorm's
moving mean and variance are that chunk's batch mean and (biased) variance; they
are read after each chunk and pooled exactly over the chunks. Memory depends on
the chunk size, never on the sample size: the sample stays as it comes (uint8
images stay uint8) and one chunk at a time is cast to float32, in a compiled
forward pass that frees each activation as soon as it is used.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf

from kerastl.models.classifier import TransferClassifier

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 32  # the default training batch size: deeper layers see chunks normalised as in training


class Moments:
    """Exact running mean and biased variance pooled over groups of equal-weight rows (Chan et al. 1979).

    Adding groups of sizes n_k with means m_k and biased variances v_k leaves
    `mean` = sum(n_k m_k) / N and `variance` = sum(n_k (v_k + m_k^2)) / N - mean^2,
    accumulated in float64 without the cancellation of that second formula.
    """

    def __init__(self):
        self.count = 0
        self.mean: np.ndarray | None = None
        self._squares: np.ndarray | None = None  # sum of squared deviations from `mean`

    def add(self, count: int, mean: np.ndarray, variance: np.ndarray) -> None:
        """Pools in a group of `count` rows with this mean and biased variance."""
        mean, variance = np.asarray(mean, np.float64), np.asarray(variance, np.float64)
        if self.count == 0:
            self.count, self.mean, self._squares = count, mean.copy(), variance * count
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self._squares = self._squares + variance * count + delta**2 * (self.count * count / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        """The pooled biased variance (never negative)."""
        return np.maximum(self._squares / self.count, 0.0)


class BatchNormCalibrator:
    """Recalibrates one classifier's backbone BatchNorm layers; keeps its compiled forward pass between calls.

    Calling it with a sample of images [n, h, w, 3] (0-255, any dtype) sets the
    statistics `recalibrate_batchnorm` describes and returns the number of layers set.
    """

    def __init__(self, model: TransferClassifier, chunk_size: int = DEFAULT_CHUNK):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be 1 or more, got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size
        self.norms = model.batchnorm_layers()
        self._forward: tf.types.experimental.PolymorphicFunction | None = None
        self._signature: tf.TensorSpec | None = None

    def _forward_for(self, images) -> tf.types.experimental.PolymorphicFunction:
        """A compiled training-mode pass over one chunk, traced once per image shape and dtype.

        It is traced, and only ever called, with every BatchNorm at momentum 0 and
        trainable: those Python attributes are read when tracing.
        """
        signature = tf.TensorSpec([None, *images.shape[1:]], tf.as_dtype(images.dtype))
        if self._forward is None or self._signature != signature:
            model = self.model

            def forward(chunk):
                model.backbone(model.preprocess_images(tf.cast(chunk, tf.float32)), training=True)

            self._forward, self._signature = tf.function(forward, input_signature=[signature]), signature
        return self._forward

    def __call__(self, images) -> int:
        count = int(images.shape[0])
        if not self.norms:  # a backbone without BatchNorm (simple_cnn): nothing to do
            return 0
        if count == 0:
            log.warning("no images to recalibrate %d BatchNorm layers with", len(self.norms))
            return 0
        saved = [(layer.momentum, layer.trainable) for layer in self.norms]
        try:
            for layer in self.norms:  # a frozen BatchNorm ignores training=True: unfreeze it meanwhile
                layer.momentum, layer.trainable = 0.0, True
            forward = self._forward_for(images)
            moments = [Moments() for _ in self.norms]
            for start in range(0, count, self.chunk_size):
                chunk = images[start : start + self.chunk_size]
                forward(tf.convert_to_tensor(chunk))
                for layer, pooled in zip(self.norms, moments):
                    pooled.add(int(chunk.shape[0]), layer.moving_mean.numpy(), layer.moving_variance.numpy())
            for layer, pooled in zip(self.norms, moments):
                _assign(layer, pooled.mean, pooled.variance)
        finally:
            for layer, (momentum, trainable) in zip(self.norms, saved):
                layer.momentum, layer.trainable = momentum, trainable
        log.debug("recalibrated %d BatchNorm layers on %d images in chunks of %d", len(self.norms), count,
                  self.chunk_size)
        return len(self.norms)


def _assign(layer: keras.layers.BatchNormalization, mean: np.ndarray, variance: np.ndarray) -> None:
    """Sets a layer's moving statistics (and, with batch renormalisation, the moving stddev)."""
    layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    if getattr(layer, "renorm", False):
        layer.moving_stddev.assign(np.sqrt(variance + layer.epsilon).astype(layer.moving_stddev.dtype))


def recalibrate_batchnorm(model: TransferClassifier, images, chunk_size: int = DEFAULT_CHUNK) -> int:
    """Sets every backbone BatchNorm's moving statistics to those of `images`, `chunk_size` images at a time.

    The resulting statistics, per BatchNorm layer and channel: with x_i the layer's
    inputs at every image and position of the sample (N of them), computed with the
    backbone in training mode on chunks of `chunk_size` images (the last one may be
    smaller), the moving mean is sum(x_i) / N and the moving variance the biased
    sum((x_i - mean)^2) / N: the exact population statistics of those inputs, in
    float64 before the cast to the variable's dtype. For the first BatchNorm (its
    inputs depend on no other BatchNorm) they are the sample's own and do not depend
    on `chunk_size`. Deeper layers see inputs that every earlier BatchNorm normalised
    with its chunk's batch statistics, as in training at batch size `chunk_size`; a
    chunk as large as the sample gives what one pass over it in training mode would.

    Frozen or not, every BatchNorm layer is updated, and its momentum and trainable
    flag are left as they were found. Peak memory is one chunk's, whatever the sample's size.

    Args:
        model: the classifier whose backbone is recalibrated.
        images: one un-augmented sample of training images [n, h, w, 3], 0-255, as an
            array or tensor of any dtype (kept as it is; each chunk is cast to float32).
            A few hundred images is plenty.
        chunk_size: images per training-mode pass; the training batch size is a good choice.

    Returns:
        The number of BatchNorm layers updated.

    Example:
    ```python
    images, _ = data.train.arrays()                          # uint8
    kerastl.recalibrate_batchnorm(model, images[:512], chunk_size=32)
    ```
    """
    return BatchNormCalibrator(model, chunk_size)(images)


class BatchNormCalibration(keras.callbacks.Callback):
    """Recalibrates BatchNorm statistics on a fixed sample before every validation (`recalibrate_batchnorm`).

    The sample is kept as it comes (pass uint8 images to keep it small); the compiled
    forward pass is traced once and reused for every validation.
    """

    def __init__(self, images, chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        self.images = images
        self.chunk_size = chunk_size
        self._calibrator: BatchNormCalibrator | None = None

    def on_test_begin(self, logs=None):
        if self._calibrator is None or self._calibrator.model is not self.model:
            self._calibrator = BatchNormCalibrator(self.model, self.chunk_size)
        self._calibrator(self.images)
