"""Weighted kNN monitor on toy features whose answer is known."""
import math
import weakref

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, TensorDataset

from pretrain.knn import extract_features, knn_accuracy, knn_predict, shard


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


# ------------------------------------------------------------------------------- 2 gloo processes
def near_and_far_bank():
    """A bank where k=3 decides: around each axis e_g of R^4 the nearest point is class g, the next
    two are class g+1 (a query on e_g is class g+1), plus one point far from every query. 13 rows
    in a fixed shuffled order, so 2 ranks get 7 and 6 of them; 8 queries (2 per axis)."""
    eye = torch.eye(4)
    rows, labels, queries, query_labels = [], [], [], []
    for g in range(4):
        rows += [eye[g] + 0.05 * eye[(g + 1) % 4], eye[g] + 0.10 * eye[(g + 2) % 4],
                 eye[g] + 0.15 * eye[(g + 3) % 4]]
        labels += [g, (g + 1) % 4, (g + 1) % 4]
        queries += [eye[g], eye[g] - 0.01 * eye[(g + 1) % 4]]
        query_labels += [(g + 1) % 4] * 2
    rows.append(-torch.ones(4))
    labels.append(0)
    order = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    return (TensorDataset(torch.stack(rows)[order], torch.tensor(labels)[order]),
            TensorDataset(torch.stack(queries), torch.tensor(query_labels)))


def knn_loaders(bank, queries):
    """This rank's shards of both, in batches of 3 (uneven: the last batch is short)."""
    return [DataLoader(shard(d), batch_size=3, shuffle=False) for d in (bank, queries)]


def _knn_rank(rank, world, init_method, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    train, val = knn_loaders(*near_and_far_bank())
    bank, labels = extract_features(lambda x: x, train, "cpu")
    top1 = knn_accuracy(lambda x: x, train, val, k=3, t=0.1, num_classes=4)
    torch.save({"bank": bank, "labels": labels, "top1": top1, "shard": len(train.dataset)},
               f"{out}/knn{rank}.pt")
    # the same processes measure what a larger bank costs (test_two_processes_hold_...)
    big_bank, queries = memory_bank_and_queries()
    loaders = [DataLoader(shard(d), batch_size=256, shuffle=False) for d in (big_bank, queries)]
    with LiveTensorBytes() as live:
        top1 = knn_accuracy(lambda x: x, *loaders, k=20, t=0.1)
    torch.save({"peak": live.peak, "top1": top1}, f"{out}/memory{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The output directory of one 2-process gloo run of _knn_rank (both tests below read it)."""
    out = tmp_path_factory.mktemp("knn_ranks")
    mp.spawn(_knn_rank, args=(2, f"file://{out / 'rendezvous'}", str(out)), nprocs=2, join=True)
    return out


def test_two_processes_score_exactly_as_one_with_k_below_the_bank_size(two_ranks):
    train, val = knn_loaders(*near_and_far_bank())
    bank, labels = extract_features(lambda x: x, train, "cpu")
    top1 = knn_accuracy(lambda x: x, train, val, k=3, t=0.1, num_classes=4)
    assert top1 == 100.0 and bank.shape == (13, 4)
    # the data tells a duplicated bank apart: every row twice, the nearest (class g) outvotes the
    # two class g+1 ones, and every query is wrong
    queries, query_labels = val.dataset.tensors
    query = F.normalize(queries, dim=1)
    doubled = knn_predict(query, bank.repeat_interleave(2, 0), labels.repeat_interleave(2), 4, k=3)
    assert (doubled.argmax(1) == query_labels).sum() == 0
    ranks = [torch.load(two_ranks / f"knn{r}.pt") for r in range(2)]
    # the same accuracy on both ranks as one process ...
    assert [r["top1"] for r in ranks] == [top1, top1] == [100.0, 100.0]
    # ... each rank extracting and keeping its share of the bank (rows rank, rank + 2, ...), bit for
    # bit; the k nearest of each shard, merged, are the whole bank's
    assert [r["shard"] for r in ranks] == [7, 6]
    for rank, r in enumerate(ranks):
        assert r["bank"].shape == (len(range(rank, 13, 2)), 4), r["bank"].shape
        assert torch.equal(r["bank"], bank[rank::2]) and torch.equal(r["labels"], labels[rank::2])


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of tensor storages alive while it is active, and their peak: every storage an op
    creates is counted from its creation until it is freed (a view keeps its storage alive); what
    existed before is not counted."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _freed(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result lies in an input's storage: nothing new
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._freed, key)
        return out


BANK_ROWS, BANK_DIM = 2048, 512  # a 4 MiB bank, large next to the 64 queries


def memory_bank_and_queries():
    """Features that are their own images: 8 classes of 256 bank rows and 8 queries each."""
    features, labels = clusters(8, BANK_ROWS // 8 + 8, BANK_DIM, noise=1.2, seed=0)
    query = torch.arange(len(labels)) % (BANK_ROWS // 8 + 8) < 8
    return (TensorDataset(features[~query], labels[~query]),
            TensorDataset(features[query], labels[query]))


def test_two_processes_hold_at_most_one_bank_each(two_ranks):
    """Measured: the peak of live tensor bytes on each rank during knn_accuracy, input batches
    included. An all-gathered bank is the whole bank on every rank plus the padded and gathered
    copies in transit (about three banks); the sharded top-k holds half of it and the queries."""
    bank, queries = memory_bank_and_queries()
    loaders = [DataLoader(d, batch_size=256, shuffle=False) for d in (bank, queries)]
    top1 = knn_accuracy(lambda x: x, *loaders, k=20, t=0.1)
    assert 50.0 < top1 < 100.0  # noisy clusters: some queries have wrong nearest neighbours
    ranks = [torch.load(two_ranks / f"memory{r}.pt") for r in range(2)]
    bank_bytes = BANK_ROWS * BANK_DIM * 4
    print(f"peak live tensor bytes per rank: {[r['peak'] for r in ranks]} "
          f"(one bank: {bank_bytes})")
    assert [r["top1"] for r in ranks] == [top1, top1]
    for r in ranks:
        assert bank_bytes // 2 < r["peak"] <= bank_bytes, r["peak"]
