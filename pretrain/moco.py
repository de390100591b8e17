"""MoCo v1/v2 (queue of keys) and MoCo v3 (in-batch keys) around any torchvision ResNet.

Reads like the official builder.py files and maps onto Algorithm 1 of the MoCo paper:

    f_k.params = f_q.params                          # MoCo.__init__
    for x in loader:
        q = f_q.forward(aug(x))                      # queries: NxC
        k = f_k.forward(aug(x)).detach()             # keys: NxC, no gradient (shuffled BN)
        l_pos = q.k, l_neg = q.queue                 # logits: Nx(1+K), positive at index 0
        loss = CrossEntropyLoss(logits / t, labels=0)
        loss.backward(); update(f_q.params)
        f_k.params = m * f_k.params + (1 - m) * f_q.params
        enqueue(queue, k); dequeue(queue)

The momentum update runs inside forward before the key forward (as in the official code), so the
keys of step t come from the key encoder updated with the query weights of step t-1.

Multi-process details (all-gather of keys, shuffling BN across ranks) live in `batch_shuffle` /
`batch_unshuffle`; with one process the same code shuffles the local batch and `SplitBatchNorm`
emulates the per-device BN statistics.
"""
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mocobench.utils import comm

# torchvision builders accepted as MODEL.ARCH: every one is a torchvision ResNet (conv1 ... layer4,
# avgpool, fc).
RESNET_ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
)


def resnet_builder(arch, zero_init_residual=False):
    """`arch` name -> callable(num_classes) building the torchvision ResNet."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"MODEL.ARCH {arch!r} is not a supported torchvision ResNet; expected one "
                         f"of {RESNET_ARCHS}")
    builder = getattr(torchvision.models, arch)
    return lambda num_classes: builder(num_classes=num_classes,
                                       zero_init_residual=zero_init_residual)


# --------------------------------------------------------------------------------------------------
# Shuffle BN
# --------------------------------------------------------------------------------------------------
class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over `num_splits` groups of the batch
    separately, i.e. what BN computes on `num_splits` devices that each hold batch/num_splits
    samples.

    Group g holds samples g, g + S, g + 2S, ... (S = num_splits): viewing the (N, C, H, W) batch as
    (N/S, S*C, H, W) puts sample i's channel c at channel (i % S) * C + c, so one fused batch_norm
    call normalises every group with its own statistics, with no copy. The batch order is random
    (and the key batch is shuffled), so this partition is as random as a per-device slice.
    Running statistics are updated per group and averaged back over the groups. Eval mode is plain
    BN, and the state dict is exactly BatchNorm2d's (checkpoints stay interchangeable).

    channels_last (NHWC) input: that reshape is not a view there (a copy in, an NCHW result out, and
    the next conv converts back). Splitting only the batch dimension, (N/S, S, C, H, W), is a view
    in any layout, so the group statistics come from one var_mean over it and the output (one fused
    multiply-add) keeps NHWC.
    """

    def __init__(self, num_features, num_splits, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c = x.shape[:2]
        s = self.num_splits
        if n % s != 0:
            raise ValueError(
                f"SplitBatchNorm: batch of {n} samples is not divisible into {s} BN groups "
                "(MOCO.SHUFFLE_BN_SPLITS must divide the per-process batch size)")
        self.num_batches_tracked.add_(1)
        momentum = (self.momentum if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked))
        if (x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            return self._forward_channels_last(x, s, momentum)
        running_mean = self.running_mean.repeat(s)
        running_var = self.running_var.repeat(s)
        out = F.batch_norm(
            x.reshape(n // s, s * c, *x.shape[2:]), running_mean, running_var,
            self.weight.repeat(s) if self.affine else None,
            self.bias.repeat(s) if self.affine else None,
            True, momentum, self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(s, c).mean(0))
            self.running_var.copy_(running_var.view(s, c).mean(0))
        return out.reshape(x.shape)

    def _forward_channels_last(self, x, s, momentum):
        n, c = x.shape[:2]
        # a view in any memory format: only the batch dim is split
        groups = x.view(n // s, s, *x.shape[1:])
        # AMP: fp32 stats
        stats_input = groups if groups.dtype in (torch.float32, torch.float64) else groups.float()
        var, mean = torch.var_mean(stats_input, dim=(0, 3, 4), correction=0,
                                   keepdim=True)  # (1, S, C, 1, 1)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.view(1, 1, c, 1, 1)
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias.view(1, 1, c, 1, 1)
        # keeps the input's NHWC strides
        out = torch.addcmul(shift.to(x.dtype), groups, scale.to(x.dtype))
        with torch.no_grad():
            count = groups.numel() // (s * c)
            unbiased = var.view(s, c) * count / max(count - 1, 1)
            self.running_mean.mul_(1 - momentum).add_(
                mean.view(s, c).mean(0).to(self.running_mean.dtype), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(
                unbiased.mean(0).to(self.running_var.dtype), alpha=momentum)
        return (out.view(x.shape) if out.is_contiguous(memory_format=torch.channels_last)
                else out.reshape(x.shape))


def convert_split_bn(module, num_splits):
    """Replace every BatchNorm2d in `module` by a SplitBatchNorm with the same parameters and
    buffers."""
    if num_splits <= 1:
        return module
    if type(module) is nn.BatchNorm2d:
        split = SplitBatchNorm(module.num_features, num_splits, eps=module.eps,
                               momentum=module.momentum, affine=module.affine,
                               track_running_stats=module.track_running_stats)
        split.load_state_dict(module.state_dict())
        return split
    for name, child in module.named_children():
        setattr(module, name, convert_split_bn(child, num_splits))
    return module


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with a gradient: every rank's output is the sum, so the gradient of the sum of
    all ranks' losses w.r.t. one rank's input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronised BN for any backend (gloo on CPU included) in plain autograd ops:
    torch.nn.SyncBatchNorm has CUDA kernels only, and DDP refuses CPU modules that contain it.

    In training it normalises with the statistics of the global batch (two-pass: the global mean,
    then the global mean squared deviation, each a differentiable all-reduce), as torch's kernel
    does, so the gradients mean the same: d(sum of all ranks' losses)/d(this rank's input). Eval
    mode and no process group are plain BN (a group of 1 runs the all-reduces); the state dict is
    BatchNorm's."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        self._check_input_dim(x)
        if not self.training or not comm.is_dist():
            return super().forward(x)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = (self.momentum if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked))
        reduce_dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        # statistics in >= float32 (AMP)
        x_input, x = x, x.to(torch.promote_types(x.dtype, torch.float32))
        # per channel: the sum over this rank's samples, and the sample count, summed over the ranks
        sums = _AllReduceSum.apply(
            torch.cat([x.sum(reduce_dims), x.new_full((1,), x.numel() // x.shape[1])]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = x - mean.view(shape)
        # biased: used to normalise
        var = _AllReduceSum.apply(centred.square().sum(reduce_dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        out = out.to(x_input.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                n = float(count)
                # running_var holds the unbiased variance, as BN's
                unbiased_var = var * n / max(n - 1.0, 1.0)
                self.running_mean.mul_(1.0 - momentum).add_(
                    mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1.0 - momentum).add_(
                    unbiased_var.to(self.running_var.dtype), alpha=momentum)
        return out


def convert_sync_bn(module, device):
    """Synchronised BN across processes (the official MoCo v3 setup): torch.nn.SyncBatchNorm on
    CUDA, our AllReduceBatchNorm elsewhere (CPU/gloo). Parameters and buffers are kept;
    SplitBatchNorm is left alone."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        sync = AllReduceBatchNorm(module.num_features, eps=module.eps, momentum=module.momentum,
                                  affine=module.affine,
                                  track_running_stats=module.track_running_stats)
        # the same Parameter and buffer objects (as torch's convert_sync_batchnorm):
        # requires_grad=False of the momentum encoder's BN parameters is kept
        sync._parameters, sync._buffers = module._parameters, module._buffers
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        setattr(module, name, convert_sync_bn(child, device))
    return module


@torch.no_grad()
def batch_shuffle(x):
    """Shuffle the key batch across all ranks. Returns this rank's slice of the shuffled global
    batch and the index that undoes the shuffle. The permutation is drawn on rank 0 and broadcast;
    with one process it is a plain shuffle of the local batch."""
    x_all = comm.all_gather_cat(x)
    world = comm.get_world_size()
    # CPU generator: the same on every device type
    perm = torch.randperm(x_all.shape[0]).to(x.device)
    if comm.is_dist():
        dist.broadcast(perm, src=0)
    idx_unshuffle = torch.argsort(perm)
    return x_all[perm.view(world, -1)[comm.get_rank()]], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x, idx_unshuffle):
    """Inverse of `batch_shuffle`: this rank gets back the keys of its own (unshuffled) samples."""
    x_all = comm.all_gather_cat(x)
    return x_all[idx_unshuffle.view(comm.get_world_size(), -1)[comm.get_rank()]]


@torch.no_grad()
def momentum_update(key_params, query_params, m):
    """theta_k <- m * theta_k + (1 - m) * theta_q, as two fused multi-tensor ops over all
    parameters."""
    torch._foreach_mul_(key_params, m)
    torch._foreach_add_(key_params, query_params, alpha=1.0 - m)


# --------------------------------------------------------------------------------------------------
# MoCo v1 / v2
# --------------------------------------------------------------------------------------------------
class MoCo(nn.Module):
    """MoCo v1 (mlp=False) and v2 (mlp=True): a query encoder, a momentum key encoder and a queue of
    keys."""

    # submodules that receive gradients: the training script wraps these (only) in
    # DistributedDataParallel
    ddp_modules = ("encoder_q",)

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False, bn_splits=1):
        """base_encoder: callable(num_classes) -> torchvision ResNet. bn_splits: SplitBatchNorm
        groups (emulated devices) when training in one process; 1 = plain BN."""
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.bn_splits = bn_splits

        self.encoder_q = base_encoder(dim)
        if mlp:  # v2: fc -> Linear(hidden, hidden), ReLU, fc
            hidden = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(),
                                              self.encoder_q.fc)
        self.encoder_q = convert_split_bn(self.encoder_q, bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # initialised as a copy of the query encoder
        for p in self.encoder_k.parameters():
            p.requires_grad = False  # updated by momentum only

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update_key_encoder(self):
        momentum_update(list(self.encoder_k.parameters()), list(self.encoder_q.parameters()),
                        self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys):
        # every rank enqueues the keys of the global batch: queues stay equal
        keys = comm.all_gather_cat(keys)
        n = keys.shape[0]
        if self.K % n != 0:
            raise ValueError(f"MOCO.K={self.K} must be divisible by the global batch size {n}")
        # replaces the oldest n keys (the official queue[:, ptr:ptr + n] = keys.T), with the
        # pointer kept on the device: int(queue_ptr) would wait for the GPU every iteration
        columns = torch.arange(n, device=self.queue_ptr.device) + self.queue_ptr
        self.queue.index_copy_(1, columns, keys.t().to(self.queue.dtype))
        self.queue_ptr.add_(n).remainder_(self.K)

    def contrastive_logits(self, q, k):
        """[q.k+, q.queue] / T: N x (1+K) with the positive at index 0, always in float32 against
        the float32 queue: under AMP a bf16 q.queue product is off by up to ~3e-2 at T = 0.07
        (logits up to 1/T = 14.3), where InfoNCE is sensitive, while l_pos would stay exact. The
        official v1/v2 recipe runs in fp32."""
        with torch.autocast(q.device.type, enabled=False):
            # scaling q costs N x C multiplications, scaling the logits N x (1+K)
            q = q.float() / self.T
            l_pos = (q * k.float()).sum(dim=1, keepdim=True)
            # a copy: autograd keeps it for the gradient of q, and the enqueue after the forward
            # writes the queue
            l_neg = torch.mm(q, self.queue.clone())
            return torch.cat([l_pos, l_neg], dim=1)

    def forward(self, im_q, im_k):
        """Returns the InfoNCE logits N x (1+K) and the labels (all 0: the positive is at
        index 0)."""
        # fp32 under AMP (autocast keeps fp32 inputs)
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        with torch.no_grad():
            self.momentum_update_key_encoder()
            shuffle = comm.is_dist() or self.bn_splits > 1
            if shuffle:
                im_k, idx_unshuffle = batch_shuffle(im_k)
            k = F.normalize(self.encoder_k(im_k).float(), dim=1)
            if shuffle:
                k = batch_unshuffle(k, idx_unshuffle)
        logits = self.contrastive_logits(q, k)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self.dequeue_and_enqueue(k)
        return logits, labels


# --------------------------------------------------------------------------------------------------
# MoCo v3
# --------------------------------------------------------------------------------------------------
def build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """Linear(no bias)-BN-ReLU hidden layers, a Linear output, and (last_bn) a BN without affine
    parameters."""
    layers = []
    for i in range(num_layers):
        dim_in = input_dim if i == 0 else mlp_dim
        dim_out = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    """MoCo v3 for ResNets: base and momentum encoders with an MLP projector (replacing fc), a
    predictor on the base side, symmetric InfoNCE against the in-batch keys of all ranks, no
    queue."""

    ddp_modules = ("base_encoder", "predictor")

    def __init__(self, base_encoder, dim=256, mlp_dim=4096, T=1.0):
        super().__init__()
        self.T = T
        self.base_encoder = base_encoder(mlp_dim)
        hidden = self.base_encoder.fc.weight.shape[1]
        self.base_encoder.fc = build_mlp(2, hidden, mlp_dim, dim)  # projector
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        for p in self.momentum_encoder.parameters():
            p.requires_grad = False
        # official: no BN after the predictor
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=False)

    @torch.no_grad()
    def momentum_update_key_encoder(self, m):
        momentum_update(list(self.momentum_encoder.parameters()),
                        list(self.base_encoder.parameters()), m)

    def contrastive_loss(self, q, k):
        q = F.normalize(q, dim=1)
        # negatives: the keys of the whole global batch
        k = comm.all_gather_cat(F.normalize(k, dim=1))
        logits = torch.mm(q, k.t().to(q.dtype)) / self.T
        n = logits.shape[0]
        labels = torch.arange(n, device=logits.device) + n * comm.get_rank()
        return F.cross_entropy(logits, labels) * (2 * self.T), logits, labels

    def forward(self, x1, x2, m):
        """Returns (loss, logits, labels); logits/labels are those of ctr(q1, k2), for
        monitoring."""
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self.momentum_update_key_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        loss12, logits, labels = self.contrastive_loss(q1, k2)
        loss21, _, _ = self.contrastive_loss(q2, k1)
        return loss12 + loss21, logits.detach(), labels


def _build_moco_v1_v2(cfg, encoder, bn_splits):
    return MoCo(encoder, dim=cfg.MOCO.DIM, K=cfg.MOCO.K, m=cfg.MOCO.M, T=cfg.MOCO.T,
                mlp=cfg.MOCO.MLP, bn_splits=bn_splits)


def _build_moco_v3(cfg, encoder, bn_splits):
    return MoCoV3(encoder, dim=cfg.MOCO.DIM, mlp_dim=cfg.MOCO.MLP_DIM, T=cfg.MOCO.T)


# MOCO.VERSION -> builder(cfg, encoder, bn_splits). v2 is v1 + MOCO.MLP + aug+ + cosine lr (set in
# the config).
MODEL_BUILDERS = {"v1": _build_moco_v1_v2, "v2": _build_moco_v1_v2, "v3": _build_moco_v3}


def build_model(cfg, bn_splits=1):
    """Build the MoCo model of MOCO.VERSION; bn_splits: SplitBatchNorm groups (1 in multi-process
    runs)."""
    encoder = resnet_builder(cfg.MODEL.ARCH, cfg.MODEL.ZERO_INIT_RESIDUAL)
    return MODEL_BUILDERS[cfg.MOCO.VERSION](cfg, encoder, bn_splits)
