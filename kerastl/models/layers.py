"""The classifier's own layers: the registry's preprocessing and the fixed feature standardisation.

Both are registered Keras layers (no Lambda), so a classifier saves to `.keras` and loads with
`safe_mode=True`.
"""

from __future__ import annotations

import keras
from keras import layers

from kerastl.models.backbones import get_spec


@keras.saving.register_keras_serializable(package="kerastl")
class BackbonePreprocessing(layers.Layer):
    """Applies the preprocessing that the registry names for `backbone` (0-255 RGB in)."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        spec = get_spec(backbone)
        self.backbone = spec.name
        self._preprocess = spec.preprocess

    def call(self, inputs):
        return self._preprocess(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


@keras.saving.register_keras_serializable(package="kerastl")
class FeatureNormalization(layers.Layer):
    """(features - mean) * scale, per feature, with statistics set from training data.

    The identity until `set_statistics` is called; the statistics are non-trainable
    weights, so they save, load and export with the model.
    """

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.mean = self.add_weight(shape=(dim,), initializer="zeros", trainable=False, name="mean")
        self.scale = self.add_weight(shape=(dim,), initializer="ones", trainable=False, name="scale")

    def call(self, inputs):
        return (inputs - keras.ops.cast(self.mean, inputs.dtype)) * keras.ops.cast(self.scale, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def set_statistics(self, mean, scale) -> None:
        """Sets the mean and the scale (1 / standard deviation) of each feature."""
        self.mean.assign(mean)
        self.scale.assign(scale)


# a layer's weight -> the attribute holding its initializer (Keras's names)
_INITIALIZERS = (("kernel", ("kernel_initializer", "depthwise_initializer")),
                 ("depthwise_kernel", ("depthwise_initializer",)), ("pointwise_kernel", ("pointwise_initializer",)),
                 ("bias", ("bias_initializer",)), ("embeddings", ("embeddings_initializer",)))


def seed_initialisation(model: keras.Model, seed: int) -> int:
    """Draws every randomly initialised weight of `model` again from its own layer's initializer,
    seeded by (`seed`, the layer's place in the model): a randomly initialised backbone is then a
    function of `seed` alone, the same in every process, without seeding any global generator
    (`keras.utils.set_random_seed` would reset the caller's). Constant initializers (zeros,
    ones: BatchNorm's statistics, most biases) are left as they are. Returns the weights drawn."""
    drawn, stack, index = 0, [model], 0
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.Model) or hasattr(layer, "layers"):
            stack.extend(reversed(getattr(layer, "layers", [])))
            if layer is not model and not layer.weights:
                continue
        index += 1
        for weight, names in _INITIALIZERS:
            variable = getattr(layer, weight, None)
            init = next((getattr(layer, n) for n in names if isinstance(getattr(layer, n, None),
                                                                           keras.initializers.Initializer)), None)
            if not isinstance(variable, keras.Variable) or init is None or "seed" not in init.get_config():
                continue
            seeded = type(init).from_config({**init.get_config(), "seed": (seed * 100_003 + index) % 2**31})
            variable.assign(seeded(variable.shape, variable.dtype))
            drawn += 1
    return drawn
