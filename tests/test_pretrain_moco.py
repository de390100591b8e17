"""MoCo core: InfoNCE logits, momentum update, queue, split BN, shuffle BN and queues on 2 gloo
ranks."""
import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from pretrain.lars import LARS
from pretrain.moco import (
    MoCo,
    MoCoV3,
    SplitBatchNorm,
    batch_shuffle,
    batch_unshuffle,
    convert_split_bn,
    momentum_update,
    resnet_builder,
)


class TinyEncoder(nn.Module):
    """A torchvision-ResNet-shaped stand-in (fc with in_features) that is fast on CPU."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def tiny_moco(**kwargs):
    torch.manual_seed(0)
    return MoCo(TinyEncoder, **{"dim": 16, "K": 32, "m": 0.99, "T": 0.07, **kwargs})


def test_infonce_logits_match_plain_reference():
    model = tiny_moco(mlp=True)
    q = F.normalize(torch.randn(8, 16), dim=1)
    k = F.normalize(torch.randn(8, 16), dim=1)
    logits = model.contrastive_logits(q, k)
    # official formulation: einsum positives, einsum negatives, cat, / T
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, model.queue.clone())
    reference = torch.cat([l_pos, l_neg], dim=1) / model.T
    assert logits.shape == (8, 1 + 32)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)),
                               F.cross_entropy(reference, torch.zeros(8, dtype=torch.long)))


def test_forward_returns_positive_at_index_0_and_gradients_reach_only_the_query_encoder():
    model = tiny_moco(bn_splits=2)
    x = torch.randn(8, 3, 8, 8)
    logits, labels = model(x, x.clone())
    assert logits.shape == (8, 33) and labels.tolist() == [0] * 8
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    assert int(model.queue_ptr) == 8


def test_mlp_head_is_hidden_width_relu():
    model = tiny_moco(mlp=True)
    fc = model.encoder_q.fc
    assert isinstance(fc, nn.Sequential) and isinstance(fc[1], nn.ReLU)
    assert fc[0].in_features == fc[0].out_features == 8 and fc[2].out_features == 16


def test_momentum_update_is_exact():
    model = tiny_moco()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q_params = [p.detach().clone() for p in model.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    model.momentum_update_key_encoder()
    for k_new, k_old, q in zip(model.encoder_k.parameters(), k_before, q_params):
        # the same arithmetic as a python loop: bit-identical
        assert torch.equal(k_new, k_old.clone().mul_(0.99).add_(q, alpha=1 - 0.99))
        # and the official formula, up to float rounding
        torch.testing.assert_close(k_new, k_old * 0.99 + q * (1.0 - 0.99), rtol=0, atol=1e-6)
        assert not torch.equal(k_new, k_old)


def test_momentum_update_m1_keeps_and_m0_copies():
    key = [torch.randn(3, 3), torch.randn(5)]
    query = [torch.randn(3, 3), torch.randn(5)]
    before = [t.clone() for t in key]
    momentum_update(key, query, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(key, before))
    momentum_update(key, query, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(key, query))


def test_queue_is_fifo_and_wraps_around():
    model = tiny_moco()  # K = 32
    batches = [F.normalize(torch.randn(8, 16), dim=1) for _ in range(5)]
    for i, keys in enumerate(batches):
        model.dequeue_and_enqueue(keys)
        assert int(model.queue_ptr) == ((i + 1) * 8) % 32
    # the 5th batch overwrote the oldest (1st) one at columns 0..7; batches 2..4 are where they were
    # put
    assert torch.equal(model.queue[:, 0:8], batches[4].t())
    for i in (1, 2, 3):
        assert torch.equal(model.queue[:, 8 * i:8 * i + 8], batches[i].t())
    assert model.queue.shape == (16, 32) and "queue" in model.state_dict() and \
        "queue_ptr" in model.state_dict()


def test_queue_size_not_divisible_by_batch_is_a_clear_error():
    model = tiny_moco()
    with pytest.raises(ValueError, match="MOCO.K=32 must be divisible by the global batch size 12"):
        model.dequeue_and_enqueue(torch.randn(12, 16))


@pytest.mark.parametrize("splits,momentum,eps", [(4, 0.1, 1e-5), (2, None, 0.5)])
def test_split_bn_statistics_are_per_group(splits, momentum, eps):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=momentum, eps=eps)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    split = convert_split_bn(copy.deepcopy(nn.Sequential(bn)), splits)[0]
    assert isinstance(split, SplitBatchNorm) and set(split.state_dict()) == set(bn.state_dict())
    assert (split.num_splits, split.momentum, split.eps) == (splits, momentum, eps)
    refs = [copy.deepcopy(bn) for _ in range(splits)]  # one BN per emulated device
    # two steps: the running statistics follow the momentum (or the cumulative average)
    for _ in range(2):
        x = torch.randn(16, 4, 5, 5) * 3 + 1
        out = split(x)
        for g in range(splits):  # group g = samples g, g+S, g+2S, ...
            torch.testing.assert_close(out[g::splits], refs[g](x[g::splits]), rtol=1e-5, atol=1e-5)
        # running stats: the average of what each device's BN would hold
        torch.testing.assert_close(split.running_mean,
                                   torch.stack([r.running_mean for r in refs]).mean(0))
        torch.testing.assert_close(split.running_var,
                                   torch.stack([r.running_var for r in refs]).mean(0))
    assert int(split.num_batches_tracked) == 2
    # and the groups really differ from one whole-batch BN
    assert not torch.allclose(out, copy.deepcopy(bn)(x), atol=1e-3)
    split.eval()
    bn.eval()
    bn.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), bn(x))


def test_split_bn_without_affine_parameters_and_conversion_flags():
    plain = nn.BatchNorm2d(3, affine=False, track_running_stats=True, eps=1e-3, momentum=0.3)
    split = convert_split_bn(nn.Sequential(plain), 2)[0]
    assert type(split) is SplitBatchNorm and not split.affine and split.weight is None
    assert (split.eps, split.momentum, split.track_running_stats) == (1e-3, 0.3, True)
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(split(x)[0::2], copy.deepcopy(plain)(x[0::2]), rtol=1e-5, atol=1e-5)
    untracked = convert_split_bn(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)), 2)[0]
    assert type(untracked) is SplitBatchNorm and not untracked.track_running_stats
    one = nn.Sequential(nn.BatchNorm2d(3))
    assert type(convert_split_bn(one, 1)[0]) is nn.BatchNorm2d  # one group: plain BN, left as it is
    direct = SplitBatchNorm(3, num_splits=2, eps=0.25, momentum=0.5)
    assert (direct.eps, direct.momentum) == (0.25, 0.5)


def test_split_batchnorm_keeps_channels_last_and_computes_the_same():
    torch.manual_seed(0)
    nchw, nhwc = SplitBatchNorm(6, 4), SplitBatchNorm(6, 4)
    nchw.weight.data.uniform_(0.5, 1.5)
    nchw.bias.data.uniform_(-1, 1)
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    x_nhwc = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    y, y_nhwc = nchw(x), nhwc(x_nhwc)
    # no conversion for the next conv
    assert y_nhwc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_nhwc, y)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_nhwc.backward(grad)
    torch.testing.assert_close(x_nhwc.grad, x.grad)
    torch.testing.assert_close(nhwc.weight.grad, nchw.weight.grad)
    torch.testing.assert_close(nhwc.bias.grad, nchw.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(nhwc, name), getattr(nchw, name))


def test_split_bn_rejects_indivisible_batch():
    split = SplitBatchNorm(4, num_splits=4)
    message = (r"batch of 6 samples is not divisible into 4 BN groups "
               r"\(MOCO.SHUFFLE_BN_SPLITS must divide the per-")
    with pytest.raises(ValueError, match=message + r"process batch size\)"):
        split(torch.randn(6, 4, 2, 2))


def test_single_process_shuffle_is_a_random_permutation_and_unshuffle_its_inverse():
    x = torch.arange(16.0).view(8, 2)
    torch.manual_seed(3)
    perm = torch.randperm(8)
    assert not torch.equal(perm, torch.arange(8))
    torch.manual_seed(3)
    shuffled, idx = batch_shuffle(x)
    # exactly the permutation drawn from torch's generator (the official code's torch.randperm), not
    # the identity
    assert torch.equal(shuffled, x[perm]) and torch.equal(idx, torch.argsort(perm))
    assert torch.equal(batch_unshuffle(shuffled, idx), x)
    # every draw is a new permutation
    draws = {tuple(batch_shuffle(x)[1].tolist()) for _ in range(5)}
    assert len(draws) == 5


@pytest.mark.parametrize("bn_splits", [2, 4])
def test_forward_computes_keys_on_the_shuffled_batch_with_split_bn(bn_splits):
    """Shuffling BN (MoCo paper, Sec. 3.3): the key encoder sees the batch in another order, so a
    sample's key and query are normalised with statistics of different sample groups. The keys the
    forward enqueues must equal the key encoder on the permuted batch, put back in order, and differ
    from the keys of the unshuffled batch; the logits are those of the normalised query against that
    key and the queue as it was before the step."""
    model = tiny_moco(bn_splits=bn_splits)
    queue_before = model.queue.clone()
    x_q, x_k = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    torch.manual_seed(11)
    perm = torch.randperm(8)  # the forward's only random draw: its shuffle
    torch.manual_seed(11)
    logits, _ = model(x_q, x_k)
    keys = model.queue[:, :8].t()
    with torch.no_grad():  # train-mode BN: the output depends on the weights and the batch only
        shuffled_keys = F.normalize(model.encoder_k(x_k[perm]), dim=1)[torch.argsort(perm)]
        unshuffled_keys = F.normalize(model.encoder_k(x_k), dim=1)
        q = F.normalize(model.encoder_q(x_q), dim=1)
    torch.testing.assert_close(keys, shuffled_keys, rtol=1e-5, atol=1e-6)
    assert (keys - unshuffled_keys).abs().max() > 1e-2  # the BN groups really differ
    reference = torch.cat([(q * keys).sum(1, keepdim=True), q @ queue_before], dim=1) / model.T
    torch.testing.assert_close(logits.detach(), reference, rtol=1e-4, atol=1e-4)


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A real 1-process gloo group, with the world size reported as 2 so that code takes its
    multi-process path: every all-reduce/all-gather then runs for real and sums over the one
    rank."""
    from mocobench.utils import comm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_all_reduce_bn_synchronised_path_is_batchnorm_when_the_sums_are_local(one_rank_group,
                                                                              momentum):
    from pretrain.moco import AllReduceBatchNorm, convert_sync_bn

    torch.manual_seed(0)
    # a large eps must be added
    bn = nn.BatchNorm2d(4, momentum=momentum, eps=1e-5 if momentum else 0.5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    sync = convert_sync_bn(nn.Sequential(copy.deepcopy(bn)), "cpu")[0]
    assert type(sync) is AllReduceBatchNorm
    for step in range(2):
        x = (torch.randn(6, 4, 3, 5) * 3 + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        grad_out = torch.randn(6, 4, 3, 5)
        out, ref = sync(x), bn(x_ref)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out.backward(grad_out)
        ref.backward(grad_out)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(sync, name).grad, getattr(bn, name).grad,
                                       rtol=1e-4, atol=1e-5)
        # running statistics as BatchNorm2d keeps them: unbiased variance, momentum (or the
        # cumulative average)
        torch.testing.assert_close(sync.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sync.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
        assert int(sync.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1
    # the synchronised path really ran: its sums went through torch.distributed (mean, then
    # variance)
    calls = []
    real_all_reduce = dist.all_reduce
    dist.all_reduce = lambda tensor, *a, **k: (calls.append(tensor.shape)
                                               or real_all_reduce(tensor, *a, **k))
    try:
        copy.deepcopy(sync)(torch.randn(6, 4, 3, 5))
    finally:
        dist.all_reduce = real_all_reduce
    assert calls == [(5,), (4,)]  # 4 channel sums + the count, then 4 squared-deviation sums
    # statistics in float32 under AMP: a bfloat16 input (4096 values per channel around 100, where
    # bfloat16 sums are off by ~0.2) gives the float32 result, rounded to bfloat16
    xb = (torch.randn(16, 4, 16, 16) + 100).to(torch.bfloat16)
    out_b = copy.deepcopy(sync)(xb)
    assert out_b.dtype == torch.bfloat16
    torch.testing.assert_close(out_b.float(), copy.deepcopy(bn)(xb.float()), rtol=0, atol=0.03)
    sync.eval()
    bn.eval()
    torch.testing.assert_close(sync(xb), bn(xb))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        sync(torch.randn(4))
    # (N, C) input: the BatchNorm1d layers of the v3 projector and predictor
    bn1d = nn.BatchNorm1d(5, momentum=momentum)
    sync1d = convert_sync_bn(nn.Sequential(copy.deepcopy(bn1d)), "cpu")[0]
    x2d = torch.randn(2, 5) * 2 - 1  # 2 samples: the unbiased variance is twice the biased one
    torch.testing.assert_close(sync1d(x2d), bn1d(x2d), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sync1d.running_var, bn1d.running_var, rtol=1e-5, atol=1e-6)


def test_all_reduce_bn_in_one_process_is_batchnorm():
    from pretrain.moco import convert_sync_bn

    bn = nn.BatchNorm2d(3)
    sync = convert_sync_bn(nn.Sequential(copy.deepcopy(bn)), "cpu")[0]
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(sync(x), bn(x))  # no process group: no collective is called
    torch.testing.assert_close(sync.running_var, bn.running_var)


def test_convert_sync_bn_keeps_parameters_and_flags_and_leaves_split_bn():
    from pretrain.moco import AllReduceBatchNorm, convert_sync_bn

    frozen = nn.BatchNorm1d(3)
    for p in frozen.parameters():
        p.requires_grad = False
    model = nn.Sequential(nn.BatchNorm2d(5, eps=1e-3, momentum=0.2), nn.Sequential(frozen),
                          SplitBatchNorm(2, num_splits=2),
                          nn.BatchNorm2d(2, affine=False, track_running_stats=False))
    model[1].eval()
    weight = model[0].weight
    converted = convert_sync_bn(model, "cpu")
    a, b, split, c = converted[0], converted[1][0], converted[2], converted[3]
    assert [type(m) for m in (a, b, split, c)] == [AllReduceBatchNorm, AllReduceBatchNorm,
                                                   SplitBatchNorm, AllReduceBatchNorm]
    assert a.weight is weight and (a.eps, a.momentum, a.num_features) == (1e-3, 0.2, 5)
    assert not b.weight.requires_grad and not b.training and a.training
    assert not c.affine and c.weight is None and not c.track_running_stats


def test_build_model_passes_the_config_on(tmp_path):
    from pretrain.config import load_config
    from pretrain.moco import build_model

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    small = ["DATA.ROOT", "unused", "MODEL.ARCH", "resnet18", "SOLVER.BATCH_SIZE", "16"]
    v1 = build_model(load_config(os.path.join(repo, "configs/pretrain/moco_v1_R50.yaml"),
                                 small + ["MOCO.K", "64", "MOCO.DIM", "8", "MOCO.M", "0.99"]),
                     bn_splits=2)
    assert type(v1) is MoCo and (v1.K, v1.m, v1.T, v1.bn_splits) == (64, 0.99, 0.07, 2)
    assert isinstance(v1.encoder_q.fc, nn.Linear) and v1.encoder_q.fc.out_features == 8
    assert v1.queue.shape == (8, 64) and isinstance(v1.encoder_q.bn1, SplitBatchNorm)
    v2 = build_model(load_config(os.path.join(repo, "configs/pretrain/moco_v2_R50_200ep.yaml"),
                                 small + ["MOCO.K", "64", "MODEL.ZERO_INIT_RESIDUAL", "True"]))
    assert type(v2) is MoCo and v2.T == 0.2 and isinstance(v2.encoder_q.fc, nn.Sequential)
    assert type(v2.encoder_q.bn1) is nn.BatchNorm2d
    # zero-init residual reaches torchvision
    assert float(v2.encoder_q.layer1[0].bn2.weight.detach().abs().max()) == 0.0
    v3 = build_model(load_config(os.path.join(repo, "configs/pretrain/moco_v3_R50.yaml"),
                                 small + ["MOCO.DIM", "8", "MOCO.MLP_DIM", "12", "MOCO.T", "0.2"]))
    assert type(v3) is MoCoV3 and v3.T == 0.2
    assert v3.base_encoder.fc[0].out_features == 12 and v3.base_encoder.fc[3].out_features == 8
    assert v3.predictor[0].in_features == 8 and v3.predictor[3].out_features == 8


def test_resnet_builder_accepts_torchvision_resnets_only():
    model = resnet_builder("resnet18")(10)
    assert model.fc.out_features == 10
    # zero-init of the last BN of each residual block (Goyal et al.) only when asked: torchvision's
    # default is off
    assert float(model.layer1[0].bn2.weight.min()) == 1.0
    zero_init = resnet_builder("resnet18", zero_init_residual=True)(10)
    assert float(zero_init.layer1[0].bn2.weight.abs().max()) == 0.0
    with pytest.raises(ValueError, match="vgg16"):
        resnet_builder("vgg16")


@pytest.mark.parametrize("T", [1.0, 0.2])
def test_moco_v3_heads_and_symmetric_loss(T):
    torch.manual_seed(0)
    model = MoCoV3(TinyEncoder, dim=4, mlp_dim=6, T=T)
    proj, pred = model.base_encoder.fc, model.predictor
    # projector ends with BN(affine=False)
    assert isinstance(proj[-1], nn.BatchNorm1d) and not proj[-1].affine
    assert isinstance(pred[-1], nn.Linear)  # predictor: no last BN (official builder.py)
    assert [type(m) for m in proj] == \
        [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    # official moco-v3 builder.py _build_mlp: Linear(..., bias=False) everywhere, hidden BN affine
    assert all(m.bias is None for m in (*proj, *pred) if isinstance(m, nn.Linear))
    assert proj[1].affine and pred[1].affine
    assert [(m.in_features, m.out_features) for m in pred if isinstance(m, nn.Linear)] == \
        [(4, 6), (6, 4)]
    assert model.T == T and all(not p.requires_grad for p in model.momentum_encoder.parameters())
    x1, x2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    k_before = [p.clone() for p in model.momentum_encoder.parameters()]
    loss, logits, labels = model(x1, x2, 0.9)
    assert logits.shape == (6, 6) and labels.tolist() == list(range(6))
    # reference: the keys come from the momentum encoder *after* the update
    with torch.no_grad():
        for p, q in zip(model.momentum_encoder.parameters(), model.base_encoder.parameters()):
            assert torch.allclose(p, k_before.pop(0) * 0.9 + q * 0.1, atol=1e-6)
    model_ref = copy.deepcopy(model)
    q1, q2 = (model_ref.predictor(model_ref.base_encoder(x1)),
              model_ref.predictor(model_ref.base_encoder(x2)))
    k1, k2 = model_ref.momentum_encoder(x1), model_ref.momentum_encoder(x2)

    def ctr(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        return F.cross_entropy(q @ k.t() / T, torch.arange(6)) * 2.0 * T  # official: scaled by 2T

    torch.testing.assert_close(loss, ctr(q1, k2) + ctr(q2, k1), rtol=1e-5, atol=1e-5)


def test_defaults_are_the_official_ones():
    # moco main_moco.py: --moco-dim 128, --moco-k 65536, --moco-m 0.999, --moco-t 0.07 (v1); moco-v3
    # main_moco.py: --moco-dim 256, --moco-mlp-dim 4096, --moco-t 1.0
    v1 = MoCo(TinyEncoder)
    assert (v1.K, v1.m, v1.T, v1.bn_splits, v1.queue.shape) == (65536, 0.999, 0.07, 1, (128, 65536))
    # the queue starts as random unit keys (columns), the pointer as a long like the official buffer
    torch.testing.assert_close(v1.queue.norm(dim=0), torch.ones(65536))
    assert v1.queue_ptr.dtype == torch.long and int(v1.queue_ptr) == 0
    assert isinstance(v1.encoder_q.fc, nn.Linear) and type(v1.encoder_q.bn) is nn.BatchNorm2d
    v3 = MoCoV3(TinyEncoder)
    assert v3.T == 1.0 and v3.base_encoder.fc[0].out_features == 4096 and \
        v3.predictor[-1].out_features == 256


def test_lars_skips_1d_params_and_scales_by_trust_ratio():
    w = nn.Parameter(torch.ones(2, 2))
    b = nn.Parameter(torch.ones(2))
    opt = LARS([w, b], lr=1.0, weight_decay=0.5, momentum=0.0, trust_coefficient=0.1)
    w.grad = torch.full((2, 2), 1.5)
    b.grad = torch.full((2,), 0.25)
    opt.step()
    # w: update = g + wd*w = 2 (norm 4), ||w|| = 2 -> trust 0.1 * 2 / 4 = 0.05 -> step 0.1
    torch.testing.assert_close(w.detach(), torch.full((2, 2), 0.9))
    # plain SGD: no wd, no trust ratio
    torch.testing.assert_close(b.detach(), torch.full((2,), 0.75))


# ------------------------------------------------------------------------------------- 2 gloo ranks
def _init_gloo(rank, world, init_method):
    # a lost peer fails in 2 min, not 30
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def _two_rank_worker(rank, world, init_method, out_dir):
    _init_gloo(rank, world, init_method)
    torch.set_num_threads(1)
    try:
        # shuffle / unshuffle across ranks
        torch.manual_seed(100 + rank)  # the permutation must come from rank 0 regardless
        x = torch.arange(8.0).view(4, 2) + 100 * rank
        shuffled, idx = batch_shuffle(x)
        restored = batch_unshuffle(shuffled * 1.0, idx)
        # queue: every rank enqueues the keys of both ranks
        torch.manual_seed(0)
        model = MoCo(TinyEncoder, dim=4, K=16, m=0.99, T=0.07)
        keys = F.normalize(torch.randn(4, 4) + rank, dim=1)
        model.dequeue_and_enqueue(keys)
        model.dequeue_and_enqueue(keys * -1)
        queue, ptr = model.queue.clone(), model.queue_ptr.clone()
        # a full forward with DDP on the query encoder only
        model.encoder_q = nn.parallel.DistributedDataParallel(model.encoder_q)
        torch.manual_seed(7 + rank)
        logits, labels = model(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))
        F.cross_entropy(logits, labels).backward()
        grads = [p.grad.clone() for p in model.encoder_q.parameters()]
        torch.save({"x": x, "shuffled": shuffled, "restored": restored, "queue": queue, "ptr": ptr,
                    "queue_after_forward": model.queue.clone(), "keys": keys, "grads": grads},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_shuffle_queue_and_ddp(tmp_path, rendezvous):
    mp.spawn(_two_rank_worker, args=(2, rendezvous, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # shuffle: each rank got half of the global batch, a permutation of it overall, and not simply
    # its own
    global_x = torch.cat([r0["x"], r1["x"]])
    got = torch.cat([r0["shuffled"], r1["shuffled"]])
    assert sorted(got[:, 0].tolist()) == sorted(global_x[:, 0].tolist())
    # ... namely the global batch in the order of rank 0's permutation (rank 1 drew another one and
    # ignored it)
    torch.manual_seed(100)
    assert torch.equal(got, global_x[torch.randperm(8)])
    assert not torch.equal(r0["shuffled"], r0["x"])
    assert torch.equal(r0["restored"], r0["x"]) and torch.equal(r1["restored"], r1["x"])
    # queues identical on both ranks, holding the keys of both ranks in rank order
    assert torch.equal(r0["queue"], r1["queue"]) and int(r0["ptr"]) == int(r1["ptr"]) == 0
    both = torch.cat([r0["keys"], r1["keys"]])
    assert torch.equal(r0["queue"][:, :8], both.t()) and torch.equal(r0["queue"][:, 8:], -both.t())
    # the forward enqueued the (gathered) keys of the step on both ranks alike
    assert torch.equal(r0["queue_after_forward"], r1["queue_after_forward"])
    assert not torch.equal(r0["queue_after_forward"], r0["queue"])
    # DDP averaged the query-encoder gradients: identical on both ranks
    assert all(torch.equal(a, b) for a, b in zip(r0["grads"], r1["grads"]))


# -------------------------------------------------------------------------------- MoCo v3 under DDP
V3_OPTS = ["MODEL.ARCH", "resnet18", "INPUT.SIZE", "32", "MOCO.DIM", "16", "MOCO.MLP_DIM", "32",
           "MOCO.M", "0.9", "MOCO.M_COS", "False", "SOLVER.BATCH_SIZE", "16",
           "SOLVER.OPTIMIZER", "sgd", "SOLVER.BASE_LR", "2.0", "SOLVER.WARMUP_EPOCHS", "0",
           "DEVICE", "cpu", "LOG_PERIOD", "1"]
V3_STEPS = 2


def _v3_cfg():
    from pretrain.config import load_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config(os.path.join(repo, "configs", "pretrain", "moco_v3_R50.yaml"), V3_OPTS)


def _v3_global_batches():
    """uint8 images, as the data loader's workers send them (the step normalises them)."""
    g = torch.Generator().manual_seed(123)
    return [tuple(torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
                  for _ in range(2)) for _ in range(V3_STEPS)]


class _StepLog:
    """What train_one_epoch reports per logged iteration (LOG_PERIOD 1): its `metrics` sink, kept in
    memory because only the main process writes metrics.json and both ranks' losses are compared
    here."""

    def __init__(self):
        self.rows = []

    def write(self, iteration, **scalars):
        self.rows.append({"iteration": iteration, **scalars})


def _v3_train(cfg, model, device, batches):
    """One epoch of pretrain.engine.train_one_epoch (fp32 on CPU) over `batches` with MoCo's task
    and the optimizer the engine builds: v3 loss, lr and momentum schedules, optimization_step."""
    from pretrain import engine
    from pretrain.config import lr_at
    from pretrain.train import MocoTask

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = engine.build_optimizer(cfg, params, lr_at(cfg, 0.0))
    loader = [((x1, x2), torch.zeros(len(x1), dtype=torch.long)) for x1, x2 in batches]
    log = _StepLog()
    iteration = engine.train_one_epoch(MocoTask(cfg), model, loader, optimizer, None, 0, 0, device,
                                       (False, torch.float32, False), log)
    assert iteration == len(batches) and \
        [r["iteration"] for r in log.rows] == list(range(1, len(batches) + 1))
    grads = {n.replace(".module.", "."): p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad}
    state = {k.replace(".module.", "."): v.clone() for k, v in model.state_dict().items()}
    return [r["loss"] for r in log.rows], grads, state


def _v3_ddp_worker(rank, world, init_method, out_dir):
    from pretrain import engine
    from pretrain import train as train_mod
    from pretrain.moco import AllReduceBatchNorm, build_model, convert_sync_bn

    _init_gloo(rank, world, init_method)
    torch.set_num_threads(1)
    try:
        cfg = _v3_cfg()
        device = torch.device("cpu")
        # as pretrain.engine.train with MoCo's task: same seed on every rank, SyncBN for v3 with > 1
        # process, rank 0's state broadcast, DDP around model.ddp_modules (base_encoder and
        # predictor, each called twice per step)
        engine.seed_all(cfg.SEED)
        model = convert_sync_bn(build_model(cfg, bn_splits=1), device)
        assert any(isinstance(m, AllReduceBatchNorm) for m in model.modules())
        model.to(device)
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
        train_mod.wrap_ddp(model, device)
        assert isinstance(model.base_encoder, nn.parallel.DistributedDataParallel)
        assert isinstance(model.predictor, nn.parallel.DistributedDataParallel)
        local = [(x1[8 * rank:8 * rank + 8], x2[8 * rank:8 * rank + 8])
                 for x1, x2 in _v3_global_batches()]
        losses, grads, state = _v3_train(cfg, model, device, local)
        torch.save({"losses": torch.tensor(losses), "grads": grads, "state": state},
                   os.path.join(out_dir, f"v3_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_moco_v3_ddp_two_ranks_with_syncbn_equals_one_process_on_the_global_batch(
        tmp_path, rendezvous):
    from pretrain.moco import build_model

    mp.spawn(_v3_ddp_worker, args=(2, rendezvous, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"v3_rank{r}.pt", weights_only=True) for r in (0, 1))

    # the ranks agree bit for bit: DDP-averaged gradients, parameters, momentum encoder and BN
    # running stats
    assert r0["grads"].keys() == r1["grads"].keys() and len(r0["grads"]) > 0
    assert all(torch.equal(r0["grads"][n], r1["grads"][n]) for n in r0["grads"])
    assert r0["state"].keys() == r1["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])

    # one process, plain BN, the global batch of 16: the same run up to float rounding
    cfg = _v3_cfg()
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg, bn_splits=1)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    losses, grads, state = _v3_train(cfg, model, torch.device("cpu"), _v3_global_batches())
    # each rank's loss is the mean over its half of the rows: the global loss is their average
    torch.testing.assert_close((r0["losses"] + r1["losses"]) / 2, torch.tensor(losses),
                               rtol=1e-5, atol=1e-5)
    assert grads.keys() == r0["grads"].keys() and state.keys() == r0["state"].keys()
    # float32 rounding differs (sums in another order, 20 BN layers deep): compare each tensor
    # relative to its largest entry. In float64 the two runs agree to ~1e-14 of that; a BN that is
    # not synchronised, a variance with n - 1, or gradients not summed over the ranks' losses are
    # off by percents.
    pairs = [(f"gradient of {n}", r0["grads"][n], g) for n, g in grads.items()]
    pairs += [(k, r0["state"][k], v) for k, v in state.items() if v.is_floating_point()]
    for name, ddp_value, reference in pairs:
        error = (ddp_value - reference).abs().max().item()
        assert error <= 2e-3 * reference.abs().max().item() + 1e-6, \
            f"{name}: max difference {error:.3g}"
    assert all(torch.equal(r0["state"][k], v) for k, v in state.items()
               if not v.is_floating_point())
    # and the run did something those tolerances can see: weights, momentum encoder, BN statistics
    # all moved
    for key in ("base_encoder.conv1.weight", "predictor.0.weight", "momentum_encoder.conv1.weight",
                "base_encoder.bn1.running_mean", "momentum_encoder.fc.1.running_var"):
        assert (state[key] - initial[key]).abs().max() > 1e-3, key


def test_moco_v2_training_moves_the_queue_by_exactly_the_keys_of_its_iterations():
    """Three iterations of the real MoCo v2 training (pretrain.engine.train_one_epoch with MoCo's
    task, the shipped CPU config: ResNet-18, split BN) with K 32 and batch 8: the pointer stands at
    3 * 8 = 24, the 24 columns those iterations wrote are new unit keys, the other 8 are the
    initial queue, bit for bit. (A run whose iterations fill the queue a whole number of times
    ends with the pointer at 0, as a run that never enqueues does.)"""
    from pretrain import engine
    from pretrain.config import load_config, lr_at
    from pretrain.moco import build_model
    from pretrain.train import MocoTask

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(repo, "configs", "pretrain", "synth_R18_cpu.yaml"),
                      ["MOCO.K", "32", "SOLVER.BATCH_SIZE", "8", "MOCO.SHUFFLE_BN_SPLITS", "2",
                       "INPUT.SIZE", "32", "DEVICE", "cpu", "LOG_PERIOD", "1"])
    assert (cfg.MOCO.VERSION, cfg.MOCO.MLP) == ("v2", True)
    iterations, batch, K = 3, cfg.SOLVER.BATCH_SIZE, cfg.MOCO.K
    engine.seed_all(cfg.SEED)
    model = build_model(cfg, bn_splits=2)
    initial = model.queue.clone()
    assert int(model.queue_ptr) == 0
    g = torch.Generator().manual_seed(0)
    loader = [(tuple(torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8)
                     for _ in range(2)), torch.zeros(batch, dtype=torch.long))
              for _ in range(iterations)]
    optimizer = engine.build_optimizer(cfg, model.parameters(), lr_at(cfg, 0.0))
    done = engine.train_one_epoch(MocoTask(cfg), model, loader, optimizer, None, 0, 0,
                                  torch.device("cpu"), (False, torch.float32, False), _StepLog())
    assert done == iterations
    written = iterations * batch
    assert int(model.queue_ptr) == written % K == 24
    changed = (model.queue != initial).any(dim=0)  # per column
    assert changed[:written].all(), f"columns never written: {(~changed[:written]).nonzero()}"
    assert torch.equal(model.queue[:, written:], initial[:, written:])
    torch.testing.assert_close(model.queue[:, :written].norm(dim=0), torch.ones(written))
