"""LARS (You et al. 2017) as MoCo v3 uses it: SGD with momentum whose step for each weight
matrix/kernel is scaled by the trust ratio eta * ||w|| / ||g + wd * w||. Biases and BN parameters
(1-d tensors) get neither weight decay nor the trust ratio, as in the official MoCo v3 code.
"""
import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # weights only: not biases, not BN gamma/beta
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * w_norm / u_norm
                    # a zero weight or zero update keeps the plain step (ratio 1)
                    update = update * torch.where((w_norm > 0) & (u_norm > 0), trust,
                                                  torch.ones_like(trust))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss
