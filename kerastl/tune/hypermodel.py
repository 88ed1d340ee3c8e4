"""`TransferHyperModel`: both training phases in one KerasTuner space.

`build(hp)` returns the classifier and `fit(hp, model, ...)` trains the head and
then fine-tunes, through the one run path (`kerastl.runs.run.run_training`), so any
KerasTuner tuner can search both phases (keras-tuner#629, #1043).
"""

from __future__ import annotations

from typing import Any

import keras_tuner

from kerastl.config import RunConfig
from kerastl.models.classifier import TransferClassifier, build_classifier
from kerastl.runs.run import checked_config, run_training
from kerastl.training.compile import compile_classifier
from kerastl.tune.space import apply_values, declare
from kerastl.tune.trial import apply_budget


class TransferHyperModel(keras_tuner.HyperModel):
    """Both phases in one KerasTuner space.

    Args:
        base: the run config that every trial starts from.
        space: setting -> list, range or value (see `kerastl.tune.space`).
        num_classes: needed by `build` (not to declare the space).

    Example:
    ```python
    hypermodel = TransferHyperModel(config, {"dropout": [0.0, 0.3], "unfreeze_blocks": [0, 2]}, num_classes=5)
    tuner = keras_tuner.RandomSearch(hypermodel, objective=make_objective("val_macro_f1"), max_trials=10)
    tuner.search(train_batches, validation_data=validation_batches)
    ```
    """

    def __init__(self, base: RunConfig, space: dict[str, Any], num_classes: int | None = None):
        super().__init__(name="kerastl")
        self.base, self.space, self.num_classes = base, space, num_classes

    def declare_hyperparameters(self, hp) -> None:
        declare(hp, self.space)

    def trial_config(self, hp) -> RunConfig:
        """The base config with this trial's values."""
        return apply_values(declare(hp, self.space), self.base)

    def build(self, hp) -> TransferClassifier:
        config = checked_config(self.trial_config(hp))
        model = build_classifier(config.model, self.num_classes, seed=config.data.seed)
        compile_classifier(model, config.train)
        return model

    def fit(self, hp, model, x, validation_data=None, callbacks=None, epochs=None, **kwargs) -> dict[str, float]:
        """Head, then fine-tuning (when the trial's values ask for it); returns the validation scores.

        `x` and `validation_data` are batched (images, labels) pipelines; `epochs`
        is Hyperband's budget when it gives one.
        """
        config = self.trial_config(hp)  # run_training checks it
        apply_budget(config.train, epochs, self.base.train.head.epochs)
        result = run_training(config, pipelines=(x, validation_data), verbose=kwargs.get("verbose", 0), model=model,
                              callbacks=callbacks, save="none")
        return result.metrics
