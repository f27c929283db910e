"""Evaluation: the free `evaluate(model, loader, accumulator)`, checkpoint evaluation, metric tables, saved masks."""

from avs.evaluation.evaluator import EvaluationError, evaluate, evaluate_split, metrics_of, pad_batch

__all__ = ["EvaluationError", "evaluate", "evaluate_split", "metrics_of", "pad_batch"]
