"""Dynamic Weight Average (DWA): Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
CVPR 2019, Eq. 7.

    w_t(e) = T · exp(r_t(e-1)/τ) / Σ_i exp(r_i(e-1)/τ),   r_t(e-1) = L_t(e-1) / L_t(e-2)

``L_t(e)`` is the mean training loss of task t over epoch e (the mean of its batch losses, as the
authors' MTAN code averages them), τ the temperature (2 in the paper) and T the number of tasks, so
Σ_t w_t = T like ``equal``. The weights are fixed for a whole epoch: during epochs 0 and 1 there is
no history yet and w = 1 (the paper's w_t(1) = w_t(2) = 1). Total = Σ_t w_t(e)·L_t.

A zero epoch mean (a task with no labelled row in an epoch has loss exactly 0) is handled by one documented
rule: where L_t(e-2) = 0 the rate is undefined (0/0, or x/0 = ∞ whose softmax limit would hand the task every
weight after an epoch without labels), so r_t = 1, the rate of a loss that did not change; L_t(e-1) = 0 after a
positive L_t(e-2) is the paper's r_t = 0. Without the rule the weights and the total loss were NaN (issue 14).

State: the running sum and count of the current epoch's raw losses, the last two epoch means and the
current weights are buffers, so a checkpoint (also one taken mid-epoch) resumes exactly. Under DDP the
losses this method receives are the global batch's (``grads.global_losses``), so every rank records the
same epoch means as one process on the whole data would.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import LossWeighting
from mtl_experiments.tasks import Task


class DWA(LossWeighting):
    def __init__(self, temperature: float = 2.0):
        super().__init__()
        hint = "the paper uses 2; larger is closer to equal weights"
        self.temperature = checks.positive_number("loss.temperature", temperature, hint=hint)

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        t = self.num_tasks
        self.register_buffer("weights", torch.ones(t))
        self.register_buffer("loss_sum", torch.zeros(t))  # this epoch's raw losses, summed over batches
        self.register_buffer("loss_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("history", torch.zeros(2, t))  # [L(e-2), L(e-1)]: the last two epoch means
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))  # epoch means recorded so far

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            self.loss_sum += losses.detach().to(self.loss_sum.dtype)
            self.loss_count += 1
        w = self.weights.to(losses.dtype)
        return (w * losses).sum(), w

    def on_train_epoch_end(self, epoch: int) -> None:
        if int(self.loss_count) == 0:  # no training batch this epoch: nothing to record
            return
        with torch.no_grad():
            mean = self.loss_sum / self.loss_count
            self.history.copy_(torch.stack([self.history[1], mean]))
            self.epochs_seen += 1
            self.loss_sum.zero_()
            self.loss_count.zero_()
            if int(self.epochs_seen) >= 2:
                self.weights.copy_(dwa_weights(self.history[0], self.history[1], self.temperature))


def dwa_weights(previous: Tensor, last: Tensor, temperature: float) -> Tensor:
    """Eq. 7: ``T · softmax((L(e-1) / L(e-2)) / τ)`` from the two previous epoch means; r_t = 1 where L_t(e-2) = 0."""
    ratio = torch.where(previous != 0, last / torch.where(previous != 0, previous, 1), 1)
    return ratio.numel() * torch.softmax(ratio / temperature, dim=0)
