"""Customized Gate Control (CGC): per-task experts plus shared experts, one gate per task over both.

Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
Personalized Recommendations", RecSys 2020, §4.2. Task ``k`` has ``m_k`` specific experts ``E_k`` and all
tasks read ``m_s`` shared experts ``E_s``:
``g^k(x) = w^k(x) · S^k(x)``, ``S^k(x) = [E_{k,1}(x), ..., E_{k,m_k}(x), E_{s,1}(x), ..., E_{s,m_s}(x)]``,
``w^k(x) = softmax(W_g^k x)`` (a gate over task k's own experts and the shared ones only), ``y^k = t^k(g^k(x))``.

CGC is PLE (§4.3) with one extraction level, and is implemented as exactly that (:class:`PLE` with
``num_levels=1``: the same modules and parameter names), so ``ple`` with ``num_levels: 1`` equals ``cgc``.
"""

from __future__ import annotations

from collections.abc import Sequence

from mtl_experiments.backbone.ple import PLE


class CGC(PLE):
    """One extraction level and one tower per task.

    ``shared_parameters()`` is the shared experts only (the one parameter group more than one task reaches:
    every task's gate reads them); task experts, gates and towers are task-specific. ``last_shared_layer``
    is the shared experts' last layer (one ``nn.Linear`` spanning all shared experts); ``gate_weights`` =
    ``{task: softmax gate [B, m_k + m_s]}`` (task k's experts first, then the shared ones).
    """

    def __init__(self, input_dim: int, task_names: Sequence[str], **options):
        # every PLE option but the number of levels, which is what makes it CGC
        super().__init__(input_dim, task_names, num_levels=1, **options)
