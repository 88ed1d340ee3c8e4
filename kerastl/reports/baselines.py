"""Is the model better than a trivial one? The check behind a run's end-of-run warning and the
report's warning box.

A classifier whose held-out accuracy is no higher than always answering the largest class (on a
balanced split: chance) has learned nothing usable, whatever its loss curve shows. The estimate
is the test split's when there is one, else the validation split's, else the cross-validated one
(over every labelled image). No TensorFlow.
"""

from __future__ import annotations

from typing import Sequence

# metric -> (the split its images are counted in, how to name the estimate)
ESTIMATES = (("test_accuracy", "test", "test"), ("val_accuracy", "validation", "validation"),
             ("cv_accuracy", "train", "cross-validated"))


def trivial_model_warning(metrics: dict[str, float], counts: dict[str, Sequence[int]],
                          class_names: Sequence[str]) -> str | None:
    """One sentence when the held-out accuracy in `metrics` is no better than always answering the
    largest class of its split (`counts`: images per class per split, as `data.json` records
    them), else None (also when nothing was held out)."""
    for key, split, name in ESTIMATES:
        images = counts.get(split)
        if key in metrics and images and sum(images) > 0:
            break
    else:
        return None
    total, largest = sum(images), max(range(len(images)), key=lambda i: images[i])
    share, accuracy = images[largest] / total, float(metrics[key])
    if accuracy > share + 1e-9:
        return None
    balanced = share <= 1 / len(images) + 1e-9
    trivial = f"chance ({share:.3f} on {len(images)} balanced classes)" if balanced else (
        f"always answering {class_names[largest]!r} ({share:.3f})")
    return (f"this model is no better than {trivial}: its {name} accuracy is {accuracy:.3f} on {total} images. "
            "It has learned nothing usable yet: check the labels, train longer, or try another backbone")
