"""Metrics vlweak logs (torchmetrics underneath) and the few the method papers define."""

from vlweak.metrics.classification import f1_at_top_k, multiclass_report, multilabel_report

__all__ = ["f1_at_top_k", "multiclass_report", "multilabel_report"]
