"""The training epoch's outputs kept for the train metrics, handed over in chunks of ``FLUSH_ROWS`` rows.

``MTLModule`` does not update its train metrics every step (a metric update costs a fixed few hundred µs per task
and call, as much as the step of a small model): it keeps each step's outputs, labels and ids here and updates the
metrics with the rows kept so far, concatenated in step order, once they hold ``FLUSH_ROWS`` rows and at the epoch's
end. Updating in step-ordered chunks gives the states of one update with all the epoch's rows: the concatenating
metrics (exact AUROC, grouped AUC) hold the same rows in the same order, the counting ones the same integers, and
the summing ones (log loss, MSE) the same sums up to the order of floating-point additions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

# Rows kept before the metrics are updated with them. 65,536 rows = 128 steps at the default batch of 512, so the
# per-update cost is paid once per ~100 steps (amortised), while the kept rows stay a few MB (T outputs, T labels
# and two ids per row): bounded whatever the epoch's length, where keeping the whole epoch grew without bound on a
# 100M-row log (docs/results.md, issue 13).
FLUSH_ROWS = 65_536
ID_KEYS = ("user_id", "item_id")  # the batch's context for grouped metrics (grouped AUC groups by user)


class KeptOutputs:
    """Each step's ``(outputs, {labels, user_id, item_id})`` since the last hand-over to ``update(outputs, batch)``
    (the metrics' update with the concatenated rows), and their row count."""

    def __init__(self, tasks: Sequence[str], update: Callable[[dict[str, Tensor], dict], None]):
        self.tasks, self.update = list(tasks), update
        self.steps: list[tuple[dict[str, Tensor], dict]] = []
        self.rows = 0

    def append(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> None:
        """Keep one step's outputs (detached) with the batch's labels and ids; ``flush()`` once ``FLUSH_ROWS`` are
        kept (per step only a list append and a row count: the training step's cost stays as it was)."""
        kept = {"labels": batch["labels"], **{k: batch[k] for k in ID_KEYS if k in batch}}
        self.steps.append(({n: o.detach() for n, o in outputs.items()}, kept))
        self.rows += len(next(iter(batch["labels"].values())))
        if self.rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Hand the kept rows, concatenated in step order, to ``update``; then nothing is kept."""
        kept = self.concatenated()
        self.clear()
        if kept is not None:
            self.update(*kept)

    def concatenated(self) -> tuple[dict[str, Tensor], dict] | None:
        """The kept steps as one ``(outputs, batch)`` in step order, or None when nothing is kept."""
        if not self.steps:
            return None
        steps = self.steps
        batch = {k: torch.cat([b[k] for _, b in steps]) for k in steps[0][1] if k != "labels"}
        batch["labels"] = {n: torch.cat([b["labels"][n] for _, b in steps]) for n in self.tasks}
        return {n: torch.cat([out[n] for out, _ in steps]) for n in self.tasks}, batch

    def clear(self) -> None:
        self.steps, self.rows = [], 0

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps (``checkpoint["mtl"]["train_outputs"]``): ``{"outputs", "batch"}`` or None."""
        out = self.concatenated()
        return None if out is None else {"outputs": out[0], "batch": out[1]}

    def load(self, state: Mapping[str, Any] | None, device: torch.device) -> None:
        """Keep what ``state()`` saved, on ``device``, as one step. A checkpoint written before the train metrics were
        updated in chunks has the same ``train_outputs``, holding the epoch's rows so far: loaded alike, and handed
        over at once when they reach ``FLUSH_ROWS``."""
        self.clear()
        if not state:
            return
        batch = {k: v.to(device) for k, v in state["batch"].items() if k != "labels"}
        batch["labels"] = {n: t.to(device) for n, t in state["batch"]["labels"].items()}
        self.append({n: t.to(device) for n, t in state["outputs"].items()}, batch)
