"""Evaluation: the free `evaluate(model, loader, evaluators)`, the built-in evaluators, checkpoint evaluation,
metric tables, saved masks."""

from avs.evaluation.evaluator import (
    DatasetEvaluator,
    EvaluationError,
    build_evaluators,
    evaluate,
    evaluate_split,
    metrics_of,
    pad_batch,
)
from avs.evaluation.evaluators import (
    LatentKLEvaluator,
    MaskWriter,
    MetricsEvaluator,
    OverlayImages,
    SemanticMaskWriter,
)

__all__ = [
    "DatasetEvaluator",
    "EvaluationError",
    "LatentKLEvaluator",
    "MaskWriter",
    "MetricsEvaluator",
    "OverlayImages",
    "SemanticMaskWriter",
    "build_evaluators",
    "evaluate",
    "evaluate_split",
    "metrics_of",
    "pad_batch",
]
