"""Item retrieval / recommendation (next item, item to recommend): a two-tower scorer over the item catalogue.

The head maps the backbone's representation to a query vector q (``output`` of this task) and holds the item
table E (ids 1..I; row 0 = unknown, never scored). An item's score is s_i = q·e_i / τ (τ: ``temperature``).
Losses (``negatives``):
- ``full``: softmax cross-entropy over the whole catalogue, −s_t + log Σ_i exp(s_i). Exact; B×I work per step.
- ``sampled``: sampled softmax with M = ``num_negatives`` negatives drawn with replacement from Q (train
  popularity, add-one smoothed, or uniform), shared by the batch; every logit is corrected to o_j − log(M·Q_j)
  (the positive too), which makes the sampled softmax a consistent estimate of the full one (Bengio & Senécal,
  IEEE TNN 2008; Jean et al., ACL 2015); a negative equal to the row's positive (an accidental hit) is masked.
- ``in_batch``: the batch's other targets are the negatives; logits s_ij − log p_j with p_j the train popularity
  share of item j (add-one smoothed), since popular items appear as negatives more often (Yi et al.,
  "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations", RecSys 2019); other rows with
  the same target as the positive are masked.
``logq_correction: false`` drops the −log Q terms (plain sampled / in-batch softmax).

Metrics (metrics/ranking.py), for every K in ``k``: ``ndcg_K``, ``hitrate_K``, ``recall_K``, ``mrr``, and on the
top-K lists ``coverage_K``, ``diversity_K`` (K >= 2; by item category when the dataset gives one, else by cosine
distance of item-table rows), ``novelty_K``. Scoring for metrics runs over the full catalogue in row chunks of
about 4M scores, so memory stays bounded for large catalogues.
``exclude: train`` removes each user's training items (given by ``set_train_interactions``) from the ranking at
evaluation and in ``recommend()``; the query's own target is never removed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from mtl_experiments import checks
from mtl_experiments.data.spec import LabelType
from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.metrics.ranking import MRR, NDCG, Coverage, Diversity, HitRate, Novelty, Recall, target_rank
from mtl_experiments.tasks.base import Task, check_integer_labels

NEGATIVES = ("full", "sampled", "in_batch")
SAMPLING = ("popularity", "uniform")
EXCLUDE = ("none", "train")
SCORE_CHUNK = 1 << 22  # scores materialised at once when ranking the catalogue (rows x items)


class RetrievalHead(nn.Module):
    """Query tower (one linear layer) and the item table; ``forward`` returns the query vector."""

    def __init__(self, in_dim: int, dim: int, num_items: int):
        super().__init__()
        self.query = nn.Linear(in_dim, dim)
        self.items = nn.Embedding(num_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.items.weight, std=dim**-0.5)  # unit-norm rows on average: scores start near 0
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.query(x)


def _ks(value, key: str) -> list[int]:
    """``k``: one cut-off or a list of them, each an integer >= 1."""
    hint = "or a list of them, e.g. [5, 10]"
    if isinstance(value, str) or not isinstance(value, int | Sequence) or (isinstance(value, Sequence) and not value):
        checks.fail(key, "an integer >= 1 or a list of them", value)
    return sorted({checks.positive_int(key, v, hint=hint) for v in ([value] if isinstance(value, int) else value)})


class RetrievalTask(Task):
    """Labels: the relevant item id per row (1..num_items; 0 = no label, e.g. no next item). See module docstring.

    The task keeps a reference to the head it built: its loss and metrics score queries against that head's item
    table, while the module hands them only the query vector (the head's output). ``head()`` builds a new head and
    re-points the reference, so the task serves the model built last.
    """

    kind = "retrieval"
    loss_type = "classification"  # a softmax likelihood over items
    label_type = LabelType.ITEM
    # serving: one query scores the whole catalogue; its probability (about 1/I each) answers another question
    # than a pointwise task's, so it enters a fusion only when the user weights it
    pointwise = False
    fusions = frozenset({"product", "sum"})

    def __init__(
        self,
        name: str,
        label: str | None = None,
        observed_if: str | None = None,
        dim: int = 32,
        negatives: str = "full",
        num_negatives: int = 100,
        sampling: str = "popularity",
        logq_correction: bool = True,
        temperature: float = 1.0,
        k: int | Sequence[int] = 10,
        exclude: str = "none",
    ):
        super().__init__(name, label, observed_if)
        key = f"data.tasks.{name}"
        self.dim = checks.positive_int(f"{key}.dim", dim)
        self.num_negatives = checks.positive_int(f"{key}.num_negatives", num_negatives)
        self.negatives = checks.choice(f"{key}.negatives", negatives, NEGATIVES)
        self.sampling = checks.choice(f"{key}.sampling", sampling, SAMPLING)
        self.exclude = checks.choice(f"{key}.exclude", exclude, EXCLUDE)
        self.logq_correction = checks.boolean(f"{key}.logq_correction", logq_correction)
        self.temperature = checks.positive_number(f"{key}.temperature", temperature)
        self.k = _ks(k, f"{key}.k")
        self.output_dim = self.dim
        self.num_items: int | None = None
        self.popularity: Tensor | None = None  # Long[I+1]: training interactions per item
        self.category: Tensor | None = None  # Long[I+1] or None
        self.generator: torch.Generator | None = None  # negatives' RNG; None: torch's global RNG (the run's seed)
        self._head: RetrievalHead | None = None
        self._seen: tuple[Tensor, Tensor] | None = None  # (row pointers by user id, item ids): CSR of train items
        self._cache: dict[tuple[str, torch.device], Tensor] = {}

    # -- catalogue -------------------------------------------------------------------------------------
    def setup(self, train_target: Tensor, items=None) -> None:
        check_integer_labels(self, train_target, "train", 0, None, "item ids are 1..num_items, 0 = no label.")
        target = train_target[train_target > 0].long()
        if items is not None:
            num_items = int(items.num_items)
        elif target.numel():
            num_items = int(target.max())
        else:
            raise DataError(f"Task '{self.name}' (retrieval): no training row has an item label (all are 0).")
        if num_items < 1:
            raise DataError(f"Task '{self.name}' (retrieval): the item catalogue is empty.")
        category = None if items is None else items.category
        if category is not None and tuple(category.shape) != (num_items + 1,):
            raise DataError(
                f"Task '{self.name}' (retrieval): item categories have shape {tuple(category.shape)}, expected "
                f"({num_items + 1},) (one per item id 0..{num_items})."
            )
        if self.k[-1] > num_items:
            raise ConfigError(
                f"Task '{self.name}' (retrieval): k={self.k[-1]} exceeds the catalogue's {num_items} items; "
                f"set data.tasks.{self.name}.k to values <= {num_items}."
            )
        self.num_items = num_items
        self.popularity = torch.bincount(target.clamp(max=num_items), minlength=num_items + 1)
        self.category = None if category is None else category.long()
        self._cache.clear()

    def _catalogue(self) -> int:
        if self.num_items is None:
            raise ConfigError(
                f"Task '{self.name}' (retrieval) does not know its item catalogue yet: the datamodule's setup() "
                "must run before the model is built."
            )
        return self.num_items

    def _log_q(self, kind: str, device: torch.device) -> Tensor:
        """log Q[1..I] (float32) of ``kind``: "popularity" (add-one smoothed train share) or "uniform"."""
        key = (kind, device)
        if key not in self._cache:
            num_items = self._catalogue()
            if kind == "uniform":
                log_q = torch.full((num_items,), -math.log(num_items), dtype=torch.float64)
            else:
                counts = self.popularity[1:].double() + 1
                log_q = counts.log() - counts.sum().log()
            self._cache[key] = log_q.float().to(device)
        return self._cache[key]

    def head(self, in_dim: int) -> nn.Module:
        self._head = RetrievalHead(in_dim, self.dim, self._catalogue())
        return self._head

    def _items(self) -> Tensor:
        """The item table E[I+1, d] of the head built last."""
        if self._head is None:
            raise RuntimeError(f"Task '{self.name}' (retrieval): head() must build the head before scoring.")
        return self._head.items.weight

    def valid(self, target: Tensor) -> Tensor:
        return target > 0

    # -- loss ------------------------------------------------------------------------------------------
    def sample_negatives(self, device: torch.device) -> Tensor:
        """M item ids (1..I) drawn with replacement from Q (``sampling``), with ``self.generator`` when set."""
        gen_device = self.generator.device if self.generator is not None else device
        probs = self._log_q(self.sampling, gen_device).exp()
        draws = torch.multinomial(probs, self.num_negatives, replacement=True, generator=self.generator)
        return (draws + 1).to(device)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        items, t = self._items(), target.long()
        q = output / self.temperature
        if self.negatives == "full":
            return F.cross_entropy(q @ items[1:].T, t - 1)
        if self.negatives == "sampled":
            neg = self.sample_negatives(q.device)
            pos_logit = (q * items[t]).sum(-1, keepdim=True)  # [B, 1]
            neg_logit = q @ items[neg].T  # [B, M]
            if self.logq_correction:
                # expected count of item j among M draws is M·Q_j
                log_mq = self._log_q(self.sampling, q.device) + math.log(self.num_negatives)
                pos_logit = pos_logit - log_mq[t - 1].unsqueeze(1)
                neg_logit = neg_logit - log_mq[neg - 1]
            neg_logit = neg_logit.masked_fill(neg[None, :] == t[:, None], float("-inf"))
            logits = torch.cat([pos_logit, neg_logit], dim=1)
            return F.cross_entropy(logits, torch.zeros_like(t))
        # in_batch: row b's positive is column b; the other rows' targets are its negatives
        logits = q @ items[t].T  # [B, B]
        if self.logq_correction:
            logits = logits - self._log_q("popularity", q.device)[t - 1][None, :]
        eye = torch.eye(len(t), dtype=torch.bool, device=t.device)
        logits = logits.masked_fill((t[None, :] == t[:, None]) & ~eye, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(t), device=t.device))

    # -- scoring ---------------------------------------------------------------------------------------
    def predict(self, output: Tensor) -> Tensor:
        """Scores of every catalogue item, [B, I]: column j is item j + 1."""
        return output @ self._items()[1:].T / self.temperature

    def catalogue_scores(self, output: Tensor) -> Tensor:
        """p_i = softmax_i(q·e_i / τ) over the catalogue, float64 [B, I] (column j = item j + 1)."""
        return torch.softmax(self.predict(output).double(), dim=-1)

    def set_train_interactions(self, user_id: Tensor, item_id: Tensor) -> None:
        """The training (user, item) pairs that ``exclude: train`` removes from each user's ranking (ids 1-based)."""
        num_items = self._catalogue()
        keep = (user_id > 0) & (item_id > 0) & (item_id <= num_items)
        key = torch.unique(user_id[keep].long().cpu() * (num_items + 1) + item_id[keep].long().cpu())  # sorted
        users, items = key // (num_items + 1), key % (num_items + 1)
        num_users = int(users.max()) if users.numel() else 0
        ptr = torch.zeros(num_users + 2, dtype=torch.long)  # user u's items: items[ptr[u] : ptr[u + 1]]
        ptr[1:] = torch.bincount(users, minlength=num_users + 1).cumsum(0)
        self._seen = (ptr, items)
        self._cache = {k: v for k, v in self._cache.items() if k[0] != "seen"}

    def _seen_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        key = ("seen", device)
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device) for t in self._seen)
        return self._cache[key]

    def _mask_seen(self, scores: Tensor, user_id: Tensor, target: Tensor | None) -> Tensor:
        """``scores`` with each row's training items set to -inf (the row's target, when given, kept)."""
        ptr, items = self._seen_on(scores.device)
        u = user_id.long().to(scores.device)
        known = (u >= 0) & (u < ptr.numel() - 1)  # users without training rows exclude nothing
        u = torch.where(known, u, torch.zeros_like(u))
        start = ptr[u]
        lens = torch.where(known, ptr[u + 1] - start, torch.zeros_like(start))
        rows = torch.repeat_interleave(torch.arange(len(u), device=u.device), lens)
        offsets = torch.arange(int(lens.sum()), device=u.device) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        cols = items[torch.repeat_interleave(start, lens) + offsets] - 1
        kept = None if target is None else scores.gather(1, target.view(-1, 1) - 1)
        scores = scores.index_put((rows, cols), torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
        return scores if kept is None else scores.scatter(1, target.view(-1, 1) - 1, kept)

    def _ranked(
        self, output: Tensor, target: Tensor | None, k: int, exclude_for: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """``(rank of each target or None, top-k scores, top-k item ids)`` over the catalogue, in row chunks;
        ``exclude_for``: user ids whose training items leave the ranking."""
        items = self._items().detach()[1:]
        if exclude_for is not None and self._seen is None:
            raise ConfigError(
                f"Task '{self.name}' (retrieval): excluding training items needs the users' training interactions "
                "(set_train_interactions), which this dataset does not provide; set exclude=none."
            )
        rows = max(1, SCORE_CHUNK // items.shape[0])
        ranks, top_scores, top_items = [], [], []
        for start in range(0, output.shape[0], rows):
            end = start + rows
            scores = output[start:end].detach() @ items.T / self.temperature
            t = None if target is None else target[start:end]
            if exclude_for is not None:
                scores = self._mask_seen(scores, exclude_for[start:end], t)
            if t is not None:
                ranks.append(target_rank(scores, t - 1))
            values, indices = scores.topk(k, dim=1)
            top_scores.append(values)
            top_items.append(indices + 1)
        return (torch.cat(ranks) if ranks else None), torch.cat(top_scores), torch.cat(top_items)

    def recommend(
        self, output: Tensor, k: int, user_id: Tensor | None = None, exclude_seen: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """Top-k ``(scores, item ids)`` per query vector, best first. ``exclude_seen`` (default: ``exclude ==
        "train"``) drops each ``user_id``'s training items (``set_train_interactions``)."""
        k = checks.positive_int("k", k)
        if k > self._catalogue():
            raise ConfigError(f"k={k} exceeds the catalogue's {self.num_items} items; choose k <= {self.num_items}.")
        if exclude_seen is None:
            exclude_seen = self.exclude == "train"
        if exclude_seen and user_id is None:
            raise ConfigError("Excluding seen items needs the users' ids.")
        _, scores, items = self._ranked(output, None, k, user_id if exclude_seen else None)
        return scores, items

    # -- metrics ---------------------------------------------------------------------------------------
    def metrics(self) -> MetricCollection:
        # before setup() the catalogue is unknown: the collection then only serves names and directions
        num_items = self.num_items or 0
        popularity = self.popularity if self.popularity is not None else torch.zeros(num_items + 1, dtype=torch.long)
        metrics = {}
        for k in self.k:
            metrics.update({f"ndcg_{k}": NDCG(k), f"hitrate_{k}": HitRate(k), f"recall_{k}": Recall(k)})
        metrics["mrr"] = MRR()
        for k in self.k:
            metrics[f"coverage_{k}"] = Coverage(k, num_items)
            if k >= 2:
                metrics[f"diversity_{k}"] = Diversity(k, self.category)
            metrics[f"novelty_{k}"] = Novelty(k, popularity)
        # no compute groups: the sum/count states of different metrics can be equal after one batch (no hit yet:
        # ndcg and hitrate both 0), and torchmetrics would merge them for good
        return MetricCollection(metrics, compute_groups=False)

    def update_metrics(
        self, metrics: MetricCollection, output: Tensor, target: Tensor, context: Mapping[str, Tensor] | None = None
    ) -> None:
        target = target.long()
        user_id = (context or {}).get("user_id")
        keep = target > 0
        if not bool(keep.all()):  # rows without an item label carry nothing to rank
            output, target = output[keep], target[keep]
            user_id = None if user_id is None else user_id[keep]
        if target.numel() == 0:
            return
        if self.exclude == "train" and user_id is None:
            raise ConfigError(
                f"Task '{self.name}' (retrieval): exclude=train needs each query's user id, and this dataset's "
                "batches carry none; set exclude=none."
            )
        ranks, _, top = self._ranked(output, target, self.k[-1], user_id if self.exclude == "train" else None)
        vectors = None
        if self.category is None and self.k[-1] >= 2:
            vectors = self._items().detach()[top]  # the recommended items' rows, for embedding diversity
        metrics.update(ranks=ranks, topk=top, topk_vectors=vectors)

    def validate_labels(self, labels: Tensor, split: str) -> None:
        check_integer_labels(
            self,
            labels,
            split,
            0,
            None if self.num_items is None else self.num_items + 1,
            f"labels are item ids 1..{self.num_items} (0 = no label); the dataset's ItemInfo.num_items must "
            "cover every item id.",
        )

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, negatives={self.negatives!r}, dim={self.dim}, k={self.k}, "
            f"num_items={self.num_items})"
        )
