"""The backbone contract (DESIGN.md §3) and the MLP block backbones are built from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from mtl_experiments import checks

if TYPE_CHECKING:
    from mtl_experiments.tasks import Task


def mlp(in_dim: int, hidden_dims: Sequence[int], dropout: float = 0.0, activation: str = "ReLU") -> nn.Sequential:
    """Linear -> activation -> dropout for each hidden size; an empty ``hidden_dims`` is the identity."""
    layers: list[nn.Module] = []
    for out_dim in hidden_dims:
        layers += [nn.Linear(in_dim, out_dim), getattr(nn, activation)()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = out_dim
    return nn.Sequential(*layers)


def mlp_output_dim(in_dim: int, hidden_dims: Sequence[int]) -> int:
    return hidden_dims[-1] if len(hidden_dims) else in_dim


def check_options(dropout: float, activation: str, tower_dims: Sequence[int] = ()) -> list[int]:
    """The options every backbone's MLPs share, checked (``backbone.<key>`` named): dropout in [0, 1), a torch.nn
    activation class name, tower sizes (possibly empty). Returns the tower sizes as ints."""
    checks.fraction("backbone.dropout", dropout, open_high=True)
    act = getattr(nn, str(activation), None)
    if not (isinstance(act, type) and issubclass(act, nn.Module)):
        checks.fail("backbone.activation", "a torch.nn activation class name", activation, hint="e.g. ReLU, GELU, SiLU")
    return checks.sizes("backbone.tower_dims", tower_dims, allow_empty=True)


class Backbone(nn.Module):
    """Maps the encoded input ``x[B, D]`` to one representation per task: ``{task: Tensor[B, output_dim]}``.

    ``shared_parameters()`` returns the dense parameters shared by several tasks (bottom MLP, experts,
    gates), never embedding tables; ``last_shared_layer`` names the module whose weight GradNorm
    measures (None when nothing is shared). A backbone whose tasks all read one shared tensor sets
    ``has_representation`` and stores that tensor as ``representation`` in each forward.

    Hooks with do-nothing defaults, for backbones whose outputs are not independent per task (ESMM):
    ``required_tasks(**options)`` names the tasks it needs, ``check_tasks(tasks)`` rejects tasks it cannot
    model (called by ``MultiTaskModel``), ``combine(outputs)`` maps the heads' raw outputs to the ones the
    losses and metrics see.
    """

    output_dim: int
    last_shared_layer: str | None = None
    has_representation: bool = False  # True if forward() stores the one shared representation ...
    representation: Tensor | None = None  # ... here, for gradient methods with grad_source=representation

    def __init__(self, input_dim: int, task_names: Sequence[str]):
        super().__init__()
        self.input_dim = input_dim
        self.task_names = list(task_names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @classmethod
    def required_tasks(cls, **options) -> list[str] | None:
        """The task names this backbone needs, given its config options; None when any task set will do."""
        return None

    def check_tasks(self, tasks: Mapping[str, Task]) -> None:
        """Raise ``ConfigError`` for tasks this backbone cannot model (e.g. a kind it has no meaning for)."""

    def combine(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The heads' raw outputs ``{task: Tensor}`` -> the outputs the losses and metrics see (identity here)."""
        return outputs
