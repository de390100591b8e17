"""Weighted kNN accuracy: the cheap representation monitor of InstDisc / MoCo-style training.

Every validation image votes with its k most similar training images (cosine similarity of
L2-normalised features); a neighbour's vote weighs exp(similarity / t). Top-1 accuracy in percent.

With several processes the bank stays sharded: each rank extracts the features of its shard of the
training images (`shard`: every world-th image) and keeps them, the queries (the validation
features, small next to the bank) are all-gathered, each rank finds every query's k nearest in its
own shard, and only those k candidates (similarity and label) per query are all-gathered and merged.
The k nearest of the union of the shards' k nearest are the k nearest of the whole bank, so the
accuracy is exactly one process's, while a rank holds 1/world of the bank (the all-gathered bank was
the whole bank on every rank, and twice more in transit). Nothing runs on rank 0 alone while the
others wait (at ImageNet scale that outlasted NCCL's 10-minute collective timeout).
"""
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from mocobench.utils import comm


def shard(dataset):
    """This rank's images: indices rank, rank + world, ... (no padding: every image exactly once
    overall)."""
    if not comm.is_dist():
        return dataset
    return Subset(dataset, range(comm.get_rank(), len(dataset), comm.get_world_size()))


def unshard(local):
    """Inverse of `shard` for per-image rows: all-gather every rank's rows and interleave them back
    into the dataset's order (row i of the result belongs to image i)."""
    if not comm.is_dist():
        return local
    world = comm.get_world_size()
    parts = comm.all_gather_uneven(local)
    out = local.new_empty((sum(p.shape[0] for p in parts), *local.shape[1:]))
    for rank, part in enumerate(parts):
        out[rank::world] = part
    return out


def _images_and_labels(batch):
    images, labels = batch[0], batch[1]
    if isinstance(images, (list, tuple)):  # a two-view dataset: the first view is enough
        images = images[0]
    return images, labels


@torch.no_grad()
def extract_features(features_fn, loader, device):
    """(features [n, D] L2-normalised float32 on `device`, labels [n] int64 on `device`) of
    `loader`'s images, in its order: with several processes `loader` holds this rank's `shard`, and
    so does the result. A DataLoader's features are written into one tensor as they come (its
    dataset says how many): the bank is held once, not as batches and their concatenation."""
    rows = len(loader.dataset) if hasattr(loader, "dataset") else None
    parts, labels, done = [], [], 0
    for batch in loader:
        images, targets = _images_and_labels(batch)
        out = F.normalize(features_fn(images.to(device, non_blocking=True)).float().flatten(1),
                          dim=1)
        if rows is not None and not parts:
            parts = [out.new_empty((rows, out.shape[1]))]
            labels = [torch.empty(rows, dtype=torch.int64, device=device)]
        if rows is not None:
            parts[0][done:done + out.shape[0]] = out
            labels[0][done:done + out.shape[0]] = targets
        else:
            parts.append(out)
            labels.append(targets.to(device))
        done += out.shape[0]
    if not done:
        raise ValueError("kNN monitor: the loader yielded no batches (empty dataset or drop_last "
                         "with too few images)")
    if rows is not None:  # no copy (torch.cat would make one)
        return parts[0][:done], labels[0][:done]
    return torch.cat(parts), torch.cat(labels)


def top_k(query, bank, bank_labels, k, bank_chunk=65536):
    """(similarities [B, k], labels [B, k]) of the k rows of `bank` most similar to each row of
    `query`, most similar first. The bank is scanned in chunks of `bank_chunk` rows keeping a
    running top-k, so the similarity matrix held at once is at most B x (bank_chunk + k). Fewer rows
    than k: padded with similarity -inf, a vote of weight 0 after every real one (so k above the
    bank's size scores as k = its size)."""
    top_sim = query.new_empty(query.shape[0], 0)
    top_labels = bank_labels.new_empty(query.shape[0], 0)
    for start in range(0, bank.shape[0], bank_chunk):
        sim = query @ bank[start : start + bank_chunk].T
        labels = bank_labels[start : start + bank_chunk].expand(query.shape[0], -1)
        sim = torch.cat([top_sim, sim], dim=1)
        labels = torch.cat([top_labels, labels], dim=1)
        top_sim, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        top_labels = labels.gather(1, idx)
    missing = k - top_sim.shape[1]
    if missing:
        top_sim = F.pad(top_sim, (0, missing), value=float("-inf"))
        top_labels = F.pad(top_labels, (0, missing), value=0)
    return top_sim, top_labels


def vote(top_sim, top_labels, num_classes, t=0.1):
    """Weighted-kNN class scores [B, num_classes]: each neighbour votes exp(similarity / t)."""
    weights = (top_sim / t).exp()
    scores = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device,
                         dtype=weights.dtype)
    scores.scatter_add_(1, top_labels, weights)
    return scores


@torch.no_grad()
def knn_predict(query, bank, bank_labels, num_classes, k=200, t=0.1, bank_chunk=65536):
    """Weighted-kNN class scores [B, num_classes] for normalised `query` [B, D] against the whole
    `bank` [N, D] (one process's view)."""
    k = min(k, bank.shape[0])
    return vote(*top_k(query, bank, bank_labels, k, bank_chunk), num_classes, t)


@torch.no_grad()
def sharded_top_k(query, bank, bank_labels, k, bank_chunk=65536):
    """top_k of `query` (the same on every rank) against the bank whose shards the ranks hold: each
    rank's k nearest in its shard, all-gathered ([world x B, k] each) and merged. Exact: the k
    nearest of the whole bank are among the union of the shards' k nearest."""
    sim, labels = top_k(query, bank, bank_labels, k, bank_chunk)
    if not comm.is_dist():
        return sim, labels
    world = comm.get_world_size()
    # [world, B, k] -> [B, world x k]: every query's candidates from every shard
    sim = comm.all_gather_cat(sim).view(world, *sim.shape).permute(1, 0, 2).flatten(1)
    labels = comm.all_gather_cat(labels).view(world, *labels.shape).permute(1, 0, 2).flatten(1)
    sim, idx = sim.topk(k, dim=1)
    return sim, labels.gather(1, idx)


@torch.no_grad()
def knn_accuracy(features_fn, train_loader, val_loader, k=200, t=0.1, num_classes=None,
                 device="cpu", bank_chunk=65536, query_chunk=1024):
    """Top-1 (%) of the weighted kNN classifier built on `train_loader`, measured on `val_loader`.

    `features_fn(images) -> [B, D]` (e.g. the query encoder). Runs under no_grad; putting the model
    in eval mode is the caller's job. With several processes the loaders hold this rank's `shard`s;
    every rank returns the same accuracy. Memory per rank: its shard of the bank (N/world x D), the
    queries of every rank (the validation features), and `query_chunk` queries against one chunk.
    """
    device = torch.device(device)
    bank, bank_labels = extract_features(features_fn, train_loader, device)
    queries, query_labels = extract_features(features_fn, val_loader, device)
    if comm.is_dist():
        # every rank scores every query against its shard of the bank
        queries, query_labels = unshard(queries), unshard(query_labels)
    if num_classes is None:
        num_classes = int(comm.all_gather_cat(bank_labels.max().view(1)).max()) + 1
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, queries.shape[0], query_chunk):
        query = queries[start:start + query_chunk]
        scores = vote(*sharded_top_k(query, bank, bank_labels, k, bank_chunk), num_classes, t)
        correct += (scores.argmax(dim=1) == query_labels[start:start + query_chunk]).sum()
    if queries.shape[0] == 0:
        raise ValueError("kNN monitor: the validation loader yielded no images")
    return 100.0 * int(correct) / queries.shape[0]
