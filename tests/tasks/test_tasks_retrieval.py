"""Retrieval task: catalogue setup, the three losses by hand (full softmax, sampled softmax with logQ correction,
in-batch negatives with logQ correction), gradients into the item table, ranking / beyond-accuracy metrics through
the task, exclusion of training items, option errors, and a tiny training run that learns a mapping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtl_experiments.data.spec import ItemInfo
from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.tasks import build_task
from mtl_experiments.tasks import retrieval as retrieval_module

# item table rows 1..3: e1 = (1, 0), e2 = (0, 1), e3 = (1, 1); the query tower is the identity (q = x)
ITEMS = [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]


def make_task(train_target=(1, 1, 1, 2), items: ItemInfo | None = None, **options):
    task = build_task("next_item", {"kind": "retrieval", "dim": 2, "k": [1, 2], **options})
    task.setup(torch.tensor(train_target), items or ItemInfo(3))
    head = task.head(2)
    with torch.no_grad():
        head.query.weight.copy_(torch.eye(2))
        head.query.bias.zero_()
        head.items.weight[1:] = torch.tensor(ITEMS)
    return task, head


def dot(q, i):
    return sum(a * b for a, b in zip(q, ITEMS[i - 1], strict=True))


def cross_entropy(logits, label):
    finite = [v for v in logits if v != -math.inf]
    return -logits[label] + math.log(sum(math.exp(v) for v in finite))


def test_setup_learns_the_catalogue_and_train_popularity():
    task = build_task("n", {"kind": "retrieval", "k": 2})
    task.setup(torch.tensor([0, 3, 1, 3, 0]), None)  # 0 = no label
    assert task.num_items == 3 and task.popularity.tolist() == [0, 1, 0, 2]
    task.setup(torch.tensor([1, 2]), ItemInfo(num_items=6, category=torch.tensor([0, 1, 1, 2, 2, 3, 3])))
    assert task.num_items == 6 and task.popularity.tolist() == [0, 1, 1, 0, 0, 0, 0]
    assert task.valid(torch.tensor([0, 2, 0])).tolist() == [False, True, False]
    head = task.head(5)
    assert head.items.num_embeddings == 7 and head(torch.randn(4, 5)).shape == (4, task.output_dim)
    assert head.items.weight[0].abs().sum() == 0  # row 0 (unknown) is never an item


def test_catalogue_errors():
    with pytest.raises(ConfigError, match="k=10 exceeds the catalogue's 3 items"):
        build_task("n", {"kind": "retrieval"}).setup(torch.tensor([1, 3]), None)
    with pytest.raises(DataError, match=r"categories have shape \(3,\), expected \(5,\)"):
        build_task("n", {"kind": "retrieval", "k": 2}).setup(torch.tensor([1]), ItemInfo(4, torch.zeros(3)))
    with pytest.raises(DataError, match="no training row has an item label"):
        build_task("n", {"kind": "retrieval", "k": 2}).setup(torch.tensor([0, 0]), None)
    task = build_task("n", {"kind": "retrieval", "k": 2})
    with pytest.raises(ConfigError, match="does not know its item catalogue"):
        task.head(4)
    task.setup(torch.tensor([1, 2]), ItemInfo(3))
    with pytest.raises(DataError, match=r"not in \[0, 4\).*num_items"):
        task.validate_labels(torch.tensor([1, 4]), "test")
    with pytest.raises(DataError, match="non-integer"):
        task.validate_labels(torch.tensor([1.5]), "val")


def test_full_softmax_loss_by_hand():
    task, head = make_task(temperature=2.0)
    x, t = [[1.0, 2.0], [0.5, -1.0]], [3, 1]
    expected = sum(cross_entropy([dot(q, i) / 2 for i in (1, 2, 3)], y - 1) for q, y in zip(x, t, strict=True)) / 2
    out = head(torch.tensor(x))
    loss = task.loss(out, torch.tensor(t))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert head.items.weight.grad[1:].abs().sum(1).gt(0).all()  # every item is in the softmax
    assert head.items.weight.grad[0].abs().sum() == 0
    scores = task.predict(out)
    assert scores.shape == (2, 3) and scores[0].tolist() == pytest.approx([0.5, 1.0, 1.5])  # column j = item j + 1


def test_sampled_softmax_loss_by_hand():
    task, head = make_task(negatives="sampled", num_negatives=4)
    task.generator = torch.Generator().manual_seed(0)
    # train targets 1, 1, 1, 2: counts 3, 1, 0 -> add-one shares Q = 4/7, 2/7, 1/7
    q_share = [4 / 7, 2 / 7, 1 / 7]
    negatives = (
        torch.multinomial(torch.tensor(q_share), 4, replacement=True, generator=torch.Generator().manual_seed(0)) + 1
    ).tolist()
    x, t = [[1.0, 2.0], [0.5, -1.0], [-1.0, 0.5]], [3, 1, 2]
    assert any(n in t for n in negatives)  # the accidental-hit mask is exercised

    def corrected(q, i):
        return dot(q, i) - math.log(4 * q_share[i - 1])

    expected = 0.0
    for q, y in zip(x, t, strict=True):
        logits = [corrected(q, y)] + [-math.inf if n == y else corrected(q, n) for n in negatives]
        expected += cross_entropy(logits, 0) / 3
    loss = task.loss(head(torch.tensor(x)), torch.tensor(t))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    grads = head.items.weight.grad.abs().sum(1)
    assert all(grads[i] > 0 for i in set(t) | set(negatives))


def test_sampled_softmax_under_uniform_sampling_needs_no_correction():
    """Uniform Q shifts every logit by the same log(M/I): the corrected and plain losses agree."""
    losses = []
    for logq in (True, False):
        task, head = make_task(negatives="sampled", num_negatives=5, sampling="uniform", logq_correction=logq)
        task.generator = torch.Generator().manual_seed(3)
        losses.append(task.loss(head(torch.tensor([[1.0, 2.0], [0.5, -1.0]])), torch.tensor([3, 1])).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("logq", [True, False])
def test_in_batch_loss_by_hand(logq):
    task, head = make_task(negatives="in_batch", logq_correction=logq)
    q_share = [4 / 7, 2 / 7, 1 / 7]
    x, t = [[1.0, 2.0], [0.5, -1.0], [-1.0, 0.5]], [1, 2, 1]  # rows 0 and 2 share their positive
    expected = 0.0
    for i, q in enumerate(x):
        logits = [dot(q, y) - (math.log(q_share[y - 1]) if logq else 0.0) for y in t]
        logits = [-math.inf if j != i and t[j] == t[i] else v for j, v in enumerate(logits)]
        expected += cross_entropy(logits, i) / 3
    loss = task.loss(head(torch.tensor(x)), torch.tensor(t))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    grads = head.items.weight.grad.abs().sum(1)
    assert grads[1] > 0 and grads[2] > 0 and grads[3] == 0  # item 3 is nobody's target: not in the batch


def test_metrics_through_the_task_by_hand():
    # categories: items 1, 2 share category 4, item 3 is category 5; train counts 3, 1, 0
    task, head = make_task(items=ItemInfo(3, torch.tensor([0, 4, 4, 5])))
    metrics = task.metrics()
    assert sorted(metrics) == sorted(
        ["ndcg_1", "hitrate_1", "recall_1", "ndcg_2", "hitrate_2", "recall_2", "mrr"]
        + ["coverage_1", "novelty_1", "coverage_2", "diversity_2", "novelty_2"]
    )
    # query (1, 2): scores 1, 2, 3 -> ranking 3, 2, 1; query (2, -1): scores 2, -1, 1 -> ranking 1, 3, 2
    out = head(torch.tensor([[1.0, 2.0], [2.0, -1.0]]))
    task.update_metrics(metrics, out, torch.tensor([2, 1]), {"user_id": torch.tensor([1, 2])})
    v = {k: val.item() for k, val in metrics.compute().items()}
    # target ranks: item 2 at rank 1, item 1 at rank 0
    assert v["hitrate_1"] == v["recall_1"] == 0.5 and v["hitrate_2"] == 1.0
    assert v["ndcg_2"] == pytest.approx((1 / math.log2(3) + 1) / 2) and v["ndcg_1"] == 0.5
    assert v["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert v["coverage_1"] == pytest.approx(2 / 3)  # items 3 and 1
    assert v["coverage_2"] == pytest.approx(1.0)  # {3, 2} and {1, 3}
    assert v["diversity_2"] == pytest.approx(1.0)  # 3 vs 2 and 1 vs 3: categories differ in both
    info = {1: -math.log2(4 / 7), 2: -math.log2(2 / 7), 3: -math.log2(1 / 7)}
    assert v["novelty_1"] == pytest.approx((info[3] + info[1]) / 2)
    assert v["novelty_2"] == pytest.approx((info[3] + info[2] + info[1] + info[3]) / 4)


def test_diversity_falls_back_to_item_embeddings_without_categories():
    task, head = make_task()
    metrics = task.metrics()
    task.update_metrics(metrics, head(torch.tensor([[1.0, 2.0]])), torch.tensor([2]))
    # top 2: items 3 (1, 1) and 2 (0, 1): cosine 1/sqrt2
    assert metrics.compute()["diversity_2"].item() == pytest.approx(1 - 1 / math.sqrt(2))


def test_rows_without_an_item_label_are_not_ranked():
    task, head = make_task()
    metrics = task.metrics()
    out = head(torch.tensor([[1.0, 2.0], [2.0, -1.0]]))
    task.update_metrics(metrics, out, torch.tensor([3, 0]))
    assert metrics.compute()["hitrate_1"].item() == 1.0  # only the first row counts


def test_ranking_in_small_chunks_gives_the_same_values(monkeypatch):
    g = torch.Generator().manual_seed(0)
    task = build_task("n", {"kind": "retrieval", "dim": 4, "k": [3, 5]})
    task.setup(torch.randint(1, 31, (200,), generator=g), None)
    head = task.head(6)
    out, target = head(torch.randn(50, 6, generator=g)), torch.randint(1, 31, (50,), generator=g)
    whole, chunked = task.metrics(), task.metrics()
    task.update_metrics(whole, out, target)
    monkeypatch.setattr(retrieval_module, "SCORE_CHUNK", 70)  # 2 rows of 30 items at a time
    task.update_metrics(chunked, out, target)
    a, b = whole.compute(), chunked.compute()
    assert all(a[k].item() == pytest.approx(b[k].item()) for k in a)


def test_exclude_train_removes_each_users_training_items_but_never_the_target():
    task, head = make_task(exclude="train", k=1)
    task.set_train_interactions(torch.tensor([1, 1, 2]), torch.tensor([3, 2, 1]))
    out = head(torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]))  # ranking 3, 2, 1
    # user 1 saw 3 and 2: target 1 becomes rank 0; user 1 with target 2 (seen, kept): rank 0; user 3: no history
    metrics = task.metrics()
    task.update_metrics(metrics, out, torch.tensor([1, 2, 1]), {"user_id": torch.tensor([1, 1, 3])})
    assert metrics.compute()["hitrate_1"].item() == pytest.approx(2 / 3)
    _, items = task.recommend(out, 2, user_id=torch.tensor([1, 2, 99]))
    assert items[0, 0].item() == 1 and items[1].tolist() == [3, 2] and items[2].tolist() == [3, 2]
    _, plain = task.recommend(out, 2, user_id=torch.tensor([1, 2, 99]), exclude_seen=False)
    assert plain.tolist() == [[3, 2]] * 3
    with pytest.raises(ConfigError, match="user id"):
        task.update_metrics(task.metrics(), out, torch.tensor([1, 2, 1]))
    fresh, fresh_head = make_task(exclude="train", k=1)
    with pytest.raises(ConfigError, match="set_train_interactions"):
        fresh.update_metrics(
            fresh.metrics(), fresh_head(torch.ones(1, 2)), torch.tensor([1]), {"user_id": torch.tensor([1])}
        )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"negatives": "hard"}, "negatives must be one of"),
        ({"sampling": "zipf"}, "sampling must be one of"),
        ({"exclude": "seen"}, "exclude must be one of"),
        ({"dim": 0}, "dim must be an integer >= 1"),
        ({"num_negatives": 0}, "num_negatives must be an integer >= 1"),
        ({"temperature": 0}, "temperature must be a finite number > 0, got 0"),
        ({"logq_correction": "yes"}, "logq_correction must be true or false"),
        ({"k": []}, "k must be an integer >= 1 or a list"),
        ({"k": "10"}, "k must be an integer >= 1 or a list"),
        ({"k": [5, 0]}, "k must be an integer >= 1"),
        ({"negative": "full"}, "invalid option"),
    ],
)
def test_bad_options_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        build_task("n", {"kind": "retrieval", **options})


@pytest.mark.parametrize("negatives", ["full", "sampled", "in_batch"])
def test_a_model_with_a_retrieval_head_learns_a_mapping(negatives):
    """user u's next item is (7u mod 40) + 1: every negative mode must learn it well above chance (10/40)."""
    torch.manual_seed(0)
    num_users, num_items = 120, 40
    users = torch.arange(num_users)
    target = (7 * users) % num_items + 1
    task = build_task(
        "next_item", {"kind": "retrieval", "dim": 16, "k": 10, "negatives": negatives, "num_negatives": 20}
    )
    task.setup(target, ItemInfo(num_items))
    model = nn.Sequential(nn.Embedding(num_users, 16), task.head(16))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        for rows in torch.randperm(num_users).split(40):
            loss = task.loss(model(users[rows]), target[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    metrics = task.metrics()
    with torch.no_grad():
        task.update_metrics(metrics, model(users), target)
    values = metrics.compute()
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])
    assert values["hitrate_10"].item() > 0.8 > 10 / num_items
