"""MoCo v2 training-step overhead: our step against the bare compute it cannot avoid, and an
official-style step.

    python benchmarks/pretrain_step.py [--rounds 15] [--steps 3] [--batch 64] [--size 64] \
        [--arch resnet18] [--k 4096] [--splits N] [--threads 2] [--clock wall|cpu]

Three steps on the same model (ResNet + MoCo v2 MLP head), batch and SplitBatchNorm modules:
  floor     query forward + backward, key forward (no_grad), zero_grad + SGD step: what any
            two-encoder training step computes. No momentum update, no shuffle, no logits, no queue.
  ours      pretrain.train's v2 step: MoCo.forward (fused momentum update, shuffle BN, logits,
            enqueue), cross-entropy, backward, SGD step.
  official  the same MoCo with the official builder.py's Python-loop momentum update
            (pk.data = pk.data * m + pq.data * (1 - m)) and einsum + cat / T logits.
Each variant has its own model and optimizer (same initial weights). Variants are interleaved over
rounds (the order rotates every round) so machine noise hits all alike; medians are printed, and
ratios both of the overall medians and as the median of the per-round ratios (and, for a machine
shared with other jobs, of the minimums, the least disturbed samples). Per-part times (momentum
update fused vs loop, contrastive head, shuffle/unshuffle, enqueue) are interleaved the same way.

MOCO.SHUFFLE_BN_SPLITS defaults to configs/pretrain/synth_R18_cpu.yaml's value (the CPU config this
benchmark's shape comes from).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.config import load_config  # noqa: E402
from pretrain.moco import MoCo, batch_shuffle, batch_unshuffle, resnet_builder  # noqa: E402
from pretrain.train import LOSSES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH_CFG = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml")


class OfficialStyleMoCo(MoCo):
    """MoCo with the official builder.py's momentum update and logits (everything else is ours)."""

    @torch.no_grad()
    def momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    def contrastive_logits(self, q, k):
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        return torch.cat([l_pos, l_neg], dim=1) / self.T


def build(cls, args, splits):
    torch.manual_seed(0)  # identical initial weights and queue for every variant
    model = cls(resnet_builder(args.arch), dim=128, K=args.k, m=0.999, T=0.2, mlp=True,
                bn_splits=splits)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03,
                                momentum=0.9, weight_decay=1e-4)
    return model, optimizer


def floor_step(model, optimizer, x1, x2):
    q = model.encoder_q(x1)
    with torch.no_grad():
        model.encoder_k(x2)
    loss = q.sum()  # any scalar: the backward through the encoder is the cost
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def moco_step(model, optimizer, x1, x2):
    # exactly pretrain.train.train_one_epoch's step (fp32, no scaler), minus logging
    loss, _, _ = LOSSES["v2"](model, x1, x2, model.m)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def head_step(model, q_leaf, k):
    """Contrastive head alone: logits, cross-entropy, backward to q."""
    q = F.normalize(q_leaf, dim=1)
    logits = model.contrastive_logits(q, k)
    loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
    loss.backward()
    q_leaf.grad = None


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleave(variants, rounds, reps, clock=time.perf_counter):
    """variants: name -> callable. Returns name -> list of per-round medians (seconds) and all
    samples."""
    names = list(variants)
    per_round = {n: [] for n in names}
    samples = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times = []
            for _ in range(reps):
                start = clock()
                variants[name]()
                times.append(clock() - start)
            per_round[name].append(statistics.median(times))
            samples[name].extend(times)
    return per_round, samples


def ratio_lines(per_round, samples, base):
    lines = []
    base_med = statistics.median(samples[base])
    for name in per_round:
        if name == base:
            continue
        overall = statistics.median(samples[name]) / base_med
        paired = statistics.median(a / b for a, b in zip(per_round[name], per_round[base]))
        fastest = min(samples[name]) / min(samples[base])
        lines.append(f"  {name} / {base}: {overall:.4f} (overall medians)   {paired:.4f} (median "
                     f"of per-round ratios)   {fastest:.4f} (minimums)")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3, help="steps of each variant per round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--splits", type=int, default=None,
                        help="SplitBatchNorm groups (default: MOCO.SHUFFLE_BN_SPLITS of "
                             "synth_R18_cpu.yaml)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time (a quiet machine); cpu: CPU time of this process, "
                             "all threads (steadier on a machine shared with other jobs; counts "
                             "OpenMP spin-waiting too)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = args.splits if args.splits is not None \
        else load_config(SYNTH_CFG).MOCO.SHUFFLE_BN_SPLITS
    if args.k % args.batch or args.batch % splits:
        parser.error(f"--k {args.k} must be divisible by --batch {args.batch}, and --batch by the "
                     f"{splits} splits")

    torch.manual_seed(1)
    x1 = torch.randn(args.batch, 3, args.size, args.size)
    x2 = torch.randn(args.batch, 3, args.size, args.size)
    floor_model, floor_opt = build(MoCo, args, splits)
    ours_model, ours_opt = build(MoCo, args, splits)
    official_model, official_opt = build(OfficialStyleMoCo, args, splits)
    steps = {
        "floor": lambda: floor_step(floor_model, floor_opt, x1, x2),
        "ours": lambda: moco_step(ours_model, ours_opt, x1, x2),
        "official": lambda: moco_step(official_model, official_opt, x1, x2),
    }
    for step in steps.values():  # warm-up: allocator, first-call overheads, optimizer state
        step()
        step()

    # parts, on a separate model so the step models are untouched
    part_model, _ = build(MoCo, args, splits)
    official_part, _ = build(OfficialStyleMoCo, args, splits)
    q_leaf = torch.randn(args.batch, 128, requires_grad=True)
    k = F.normalize(torch.randn(args.batch, 128), dim=1)
    parts = {
        "momentum update, fused (ours)": part_model.momentum_update_key_encoder,
        "momentum update, python loop (official)": official_part.momentum_update_key_encoder,
        "contrastive head fwd+bwd (ours)": lambda: head_step(part_model, q_leaf, k),
        "contrastive head fwd+bwd (official)": lambda: head_step(official_part, q_leaf, k),
        "shuffle + unshuffle": lambda: batch_unshuffle(*batch_shuffle(x2)),
        "dequeue and enqueue": lambda: part_model.dequeue_and_enqueue(k),
    }
    for part in parts.values():
        part()

    started = time.perf_counter()
    clock = CLOCKS[args.clock]
    step_rounds, step_samples = interleave(steps, args.rounds, args.steps, clock)
    part_rounds, part_samples = interleave(parts, args.rounds, 10, clock)
    elapsed = time.perf_counter() - started

    n_params = sum(p.numel() for p in floor_model.encoder_q.parameters())
    print(f"MoCo v2 step, {args.arch} + MLP head ({n_params / 1e6:.1f} M params), {args.size} px, "
          f"batch {args.batch}, K {args.k}, SplitBatchNorm splits {splits}, CPU, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{args.rounds} rounds x {args.steps} steps per variant, interleaved; {args.clock} "
          f"clock; {elapsed:.0f} s measuring")
    print("step time (median, ms):")
    for name, times in step_samples.items():
        print(f"  {name:9s} {1e3 * statistics.median(times):8.1f}   "
              f"(min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f})")
    print("ratios:")
    for line in ratio_lines(step_rounds, step_samples, "floor"):
        print(line)
    print("parts (ms over rounds x 10 calls):")
    for name, times in part_samples.items():
        print(f"  {name:40s} median {1e3 * statistics.median(times):7.2f}   min "
              f"{1e3 * min(times):7.2f}")


if __name__ == "__main__":
    main()
