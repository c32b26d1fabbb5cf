"""What a distilled dataset is worth: train ConvNet on it, test on real images.

``evaluate(archive, testset)`` follows the dataset-distillation benchmark protocol (see
``worker.evaluate.train``); ``python -m worker.evaluate ARCHIVE TESTSET`` is its command line.
Importing this package only defines things: no device, thread or RNG state is touched.
"""

from worker.evaluate.data import (
    BY_INDEX,
    BY_NAME,
    ClassOrderError,
    EvaluationError,
    check_class_order,
    load_archive,
    load_testset,
)
from worker.evaluate.train import PROFILES, EvaluationResult, Progress, evaluate

__all__ = [
    "BY_INDEX",
    "BY_NAME",
    "PROFILES",
    "ClassOrderError",
    "EvaluationError",
    "EvaluationResult",
    "Progress",
    "check_class_order",
    "evaluate",
    "load_archive",
    "load_testset",
]
