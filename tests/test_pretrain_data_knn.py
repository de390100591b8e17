"""Weighted kNN monitor on toy features whose answer is known."""
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.knn import knn_accuracy, knn_predict


def batches(features, labels, batch_size=64):
    return [(features[i : i + batch_size], labels[i : i + batch_size])
            for i in range(0, len(labels), batch_size)]


def clusters(num_classes, per_class, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * 5
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def reference_scores(query, bank, bank_labels, num_classes, k, t):
    """Unchunked weighted kNN written the InstDisc way, to check the chunked one against."""
    sim = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    top_sim, idx = sim.topk(k, dim=1)
    one_hot = F.one_hot(bank_labels[idx], num_classes).float()
    return (one_hot * (top_sim / t).exp()[..., None]).sum(dim=1)


def test_separated_clusters_give_100_percent():
    train = clusters(5, 60, 16, noise=0.3, seed=0)
    val = clusters(5, 20, 16, noise=0.3, seed=0)  # same centres, fresh noise below
    val = (val[0] + 0.1 * torch.randn(val[0].shape, generator=torch.Generator().manual_seed(9)),
           val[1])
    acc = knn_accuracy(lambda x: x, batches(*train), batches(*val), k=20, t=0.1, num_classes=5,
                       device="cpu")
    assert acc == 100.0


def test_random_features_are_near_chance():
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(1000, 32, generator=g), torch.randint(0, 5, (1000,), generator=g))
    val = (torch.randn(1000, 32, generator=g), torch.randint(0, 5, (1000,), generator=g))
    acc = knn_accuracy(lambda x: x, batches(*train), batches(*val), k=50, t=0.1, num_classes=5)
    assert abs(acc - 20.0) < 4 * 100 * math.sqrt(0.2 * 0.8 / 1000)


def test_chunked_bank_equals_unchunked_reference():
    g = torch.Generator().manual_seed(2)
    bank, labels = torch.randn(300, 8, generator=g), torch.randint(0, 7, (300,), generator=g)
    query = torch.randn(40, 8, generator=g)
    expected = reference_scores(query, bank, labels, 7, k=25, t=0.07)
    for chunk in (7, 25, 1000):
        query_n, bank_n = F.normalize(query, dim=1), F.normalize(bank, dim=1)
        got = knn_predict(query_n, bank_n, labels, 7, k=25, t=0.07, bank_chunk=chunk)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4), chunk


def test_two_view_batches_and_k_larger_than_bank():
    train = clusters(3, 4, 8, noise=0.1, seed=3)
    two_view = [((x, x + 100), y) for x, y in batches(*train, batch_size=5)]
    acc = knn_accuracy(lambda x: x, two_view, batches(*train), k=200, t=0.1, num_classes=3)
    assert acc == 100.0  # k is capped at the 12 bank entries; the first view is used


def test_empty_loader_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        knn_accuracy(lambda x: x, [], [], num_classes=2)
