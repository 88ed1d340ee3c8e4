"""The search's settings: `TuneConfig`, and which run settings a search may vary.

No TensorFlow here: the command line reads the choices for its help text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kerastl.choices import IMBALANCE_RATIO, OBJECTIVES
from kerastl.config import SETTINGS, JsonConfig
from kerastl.errors import KerastlError
from kerastl.settings import Setting, setting, settings_of

TUNERS = ("random", "bayesian", "hyperband")
ISOLATION = ("auto", "always", "never")

# the settings a search may vary (declared `search=N` in `kerastl.config`), in their declaration order
SPACE_FIELDS: dict[str, Setting] = dict(sorted(((name, item) for name, item in SETTINGS.items() if item.search),
                                               key=lambda pair: pair[1].search))
AUTO_OBJECTIVE = "auto"  # val_accuracy, or val_macro_f1 when the classes are imbalanced (see IMBALANCE_RATIO)

TRIAL_STRATEGIES = ("one", "mirrored")


@dataclass
class TuneConfig(JsonConfig):
    """A KerasTuner search over a run config (see `kerastl.tune.space` for `space`).

    Attributes:
        tuner: "random", "bayesian" or "hyperband".
        objective: one of `OBJECTIVES` (its direction is known), scored on the
            validation split with the trial's best weights restored; "auto" is
            val_accuracy, or val_macro_f1 when the largest class has more than
            `kerastl.config.IMBALANCE_RATIO` times the smallest's training images.
        max_trials: trials to run (for hyperband, set by `epochs` and its factor instead).
        project_dir: the search's folder: KerasTuner state, one folder per trial,
            saved phase-1 heads, results. Running again on it resumes.
        space: setting -> list, range or fixed value; None is `DEFAULT_SPACE`.
        workers: 1 runs trials one at a time in this process; N > 1 starts a chief
            and N worker processes (one per GPU when there are GPUs); 0 means one
            worker per GPU, or 1 without GPUs.
        isolate: run each trial in its own process: "auto" (trials that run the
            backbone: fine-tuning, no cache, from scratch), "always" or "never".
        trial_strategy: "one": each trial on one device (with GPUs, a worker per GPU); "mirrored": each
            trial over every GPU of its worker (`DeviceConfig.strategy` "mirrored"), one worker per host.
        mixed_precision: 0.2's switch, read from older `search.json` files: True is precision
            "mixed_float16", False "float32" (see `kerastl.devices.DeviceConfig.precision`).
        max_failures: stop the search after this many failed trials in a row.
        population: head-only trials that run in this process are claimed from the oracle this
            many at a time (as parallel workers claim them) and their heads trained together on
            the same cached batches (`kerastl.runs.population`); each reports as its own trial.
    """

    tuner: str = setting("random", "", kind="choice", choices=TUNERS)
    objective: str = setting(AUTO_OBJECTIVE, "scored on the validation split; loss is minimised, the others "
                             f"maximised; auto: val_accuracy, or val_macro_f1 when classes are imbalanced beyond "
                             f"{IMBALANCE_RATIO:g}:1", kind="choice", choices=(AUTO_OBJECTIVE, *OBJECTIVES))
    max_trials: int = setting(10, "trials to run", kind="count:1", metavar="N")
    project_dir: str = setting("tuning", "search state, trials and results; rerun to resume", metavar="DIR")
    space: dict[str, Any] | None = setting(None, "setting -> list, range or fixed value", hidden=True)
    workers: int = setting(1, "1: trials one at a time here; N>1: a chief and N worker processes, one per GPU when "
                           "there are GPUs; 0: one per GPU", kind="count:0", metavar="N")
    isolate: str = setting("auto", "one process per trial: auto does so for trials that run the backbone",
                           kind="choice", choices=ISOLATION)
    trial_strategy: str = setting("one", "one: each trial on one device, a worker per GPU; mirrored: each trial "
                                  "over every GPU of its worker", kind="choice", choices=TRIAL_STRATEGIES)
    mixed_precision: bool | None = setting(None, "0.2's switch: --no-mixed-precision is --precision float32",
                                           kind="bool", shown="")
    max_failures: int = setting(3, "stop after N failed trials in a row", kind="count:1", metavar="N")
    population: int = setting(32, "head-only trials on cached features trained at once, in one graph (1: one at "
                              "a time)", kind="count:1", metavar="N")
    hyperband_factor: int = setting(3, "Hyperband's reduction factor", kind="count:2", hidden=True)

    def validate(self) -> None:
        if self.tuner not in TUNERS:
            raise KerastlError(f"tuner must be one of {list(TUNERS)}, got {self.tuner!r}")
        if self.objective not in (AUTO_OBJECTIVE, *OBJECTIVES):
            raise KerastlError(f"objective must be one of {[AUTO_OBJECTIVE, *OBJECTIVES]}, got {self.objective!r}")
        if self.isolate not in ISOLATION:
            raise KerastlError(f"isolate must be one of {list(ISOLATION)}, got {self.isolate!r}")
        for name in ("max_trials", "max_failures", "population"):
            if getattr(self, name) < 1:
                raise KerastlError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.trial_strategy == "mirrored" and self.workers > 1:
            raise KerastlError("trial_strategy=mirrored runs each trial over every GPU of one worker: give workers=1 "
                               "(or 0), or trial_strategy=one for a worker per GPU")
        if self.trial_strategy not in TRIAL_STRATEGIES:
            raise KerastlError(f"trial_strategy must be one of {list(TRIAL_STRATEGIES)}, got {self.trial_strategy!r}")
        if self.workers < 0:
            raise KerastlError(f"workers must be 0 or more, got {self.workers}")
        if self.hyperband_factor < 2:
            raise KerastlError(f"hyperband_factor must be at least 2, got {self.hyperband_factor}")


# the search's own settings: the `tune` command's flags (derived from the fields above)
TUNE_SETTINGS: dict[str, Setting] = settings_of(TuneConfig, group_name="search")
