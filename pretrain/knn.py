"""Weighted kNN accuracy: the cheap representation monitor of InstDisc / MoCo-style training.

Every validation image votes with its k most similar training images (cosine similarity of
L2-normalised features); a neighbour's vote weighs exp(similarity / t). Top-1 accuracy in percent.

With several processes each rank extracts the features of its shard (`shard`: every world-th image)
and the bank is all-gathered back into the dataset's order, so every rank holds the bank one process
would build, in 1/world of the time; each rank then scores its shard of the validation images and
the counts are summed. Nothing runs on rank 0 alone while the others wait (at ImageNet scale that
outlasted NCCL's 10-minute collective timeout).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Subset

from mocobench.utils import comm


def shard(dataset):
    """This rank's images: indices rank, rank + world, ... (no padding: every image exactly once
    overall)."""
    world = comm.get_world_size()
    return dataset if world == 1 else Subset(dataset, range(comm.get_rank(), len(dataset), world))


def unshard(local):
    """Inverse of `shard` for per-image rows: all-gather every rank's rows and interleave them back
    into the dataset's order (row i of the result belongs to image i)."""
    world = comm.get_world_size()
    if world == 1:
        return local
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
    """(features [N, D] L2-normalised float32 on `device`, labels [N] int64 on `device`) of
    `loader`'s images; with several processes `loader` holds this rank's `shard` and the result is
    the whole bank."""
    features, labels = [], []
    for batch in loader:
        images, targets = _images_and_labels(batch)
        out = features_fn(images.to(device, non_blocking=True))
        features.append(F.normalize(out.float().flatten(1), dim=1))
        labels.append(targets.to(device, non_blocking=True))
    if not features:
        raise ValueError("kNN monitor: the loader yielded no batches (empty dataset or drop_last "
                         "with too few images)")
    return unshard(torch.cat(features)), unshard(torch.cat(labels))


@torch.no_grad()
def knn_predict(query, bank, bank_labels, num_classes, k=200, t=0.1, bank_chunk=65536):
    """Weighted-kNN class scores [B, num_classes] for normalised `query` [B, D] against
    `bank` [N, D].

    The bank is scanned in chunks of `bank_chunk` rows, keeping a running top-k, so the similarity
    matrix held at once is at most B x (bank_chunk + k).
    """
    k = min(k, bank.shape[0])
    top_sim = query.new_empty(query.shape[0], 0)
    top_labels = bank_labels.new_empty(query.shape[0], 0)
    for start in range(0, bank.shape[0], bank_chunk):
        sim = query @ bank[start : start + bank_chunk].T
        labels = bank_labels[start : start + bank_chunk].expand(query.shape[0], -1)
        sim = torch.cat([top_sim, sim], dim=1)
        labels = torch.cat([top_labels, labels], dim=1)
        top_sim, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        top_labels = labels.gather(1, idx)
    weights = (top_sim / t).exp()
    scores = torch.zeros(query.shape[0], num_classes, device=query.device, dtype=weights.dtype)
    scores.scatter_add_(1, top_labels, weights)
    return scores


@torch.no_grad()
def knn_accuracy(features_fn, train_loader, val_loader, k=200, t=0.1, num_classes=None,
                 device="cpu", bank_chunk=65536):
    """Top-1 (%) of the weighted kNN classifier built on `train_loader`, measured on `val_loader`.

    `features_fn(images) -> [B, D]` (e.g. the query encoder). Runs under no_grad; putting the model
    in eval mode is the caller's job. Memory: the train feature bank (N x D) plus one val batch
    against one chunk. With several processes the loaders hold this rank's `shard`s; every rank
    returns the same accuracy.
    """
    device = torch.device(device)
    bank, bank_labels = extract_features(features_fn, train_loader, device)
    if num_classes is None:
        num_classes = int(bank_labels.max()) + 1
    correct = total = 0
    for batch in val_loader:
        images, targets = _images_and_labels(batch)
        features = features_fn(images.to(device, non_blocking=True))
        query = F.normalize(features.float().flatten(1), dim=1)
        scores = knn_predict(query, bank, bank_labels, num_classes, k=k, t=t, bank_chunk=bank_chunk)
        targets = targets.to(device)
        correct += int((scores.argmax(dim=1) == targets).sum())
        total += targets.numel()
    if comm.get_world_size() > 1:
        counts = torch.tensor([correct, total], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        correct, total = (int(c) for c in counts.tolist())
    if total == 0:
        raise ValueError("kNN monitor: the validation loader yielded no images")
    return 100.0 * correct / total
