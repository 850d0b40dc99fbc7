"""Metrics: task metrics (task.py) and, later, task-conflict metrics; all torchmetrics ``Metric``s."""
