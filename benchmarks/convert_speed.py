"""How long `mocobench convert` takes on a ResNet-50 in the official MoCo v2 layout (random weights).

    python benchmarks/convert_speed.py [--depth 50] [--repeats 3]

Prints the wall time of reading + converting + verifying + writing, and of verification alone.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convert import convert_checkpoint  # noqa: E402


def moco_checkpoint(depth):
    trunk = {k: v for k, v in getattr(torchvision.models, f"resnet{depth}")().state_dict().items()
             if not k.startswith("fc.")}
    width = 2048 if depth >= 50 else 512
    head = {"fc.0.weight": torch.randn(width, width), "fc.0.bias": torch.zeros(width),
            "fc.2.weight": torch.randn(128, width), "fc.2.bias": torch.zeros(128)}
    state = {"module.encoder_q." + k: v for k, v in {**trunk, **head}.items()}
    state.update({"module.encoder_k." + k: v.clone() for k, v in {**trunk, **head}.items()})
    state["module.queue"] = torch.randn(128, 65536)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": f"resnet{depth}", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=50, choices=[18, 34, 50, 101, 152])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint_0199.pth.tar")
        torch.save(moco_checkpoint(args.depth), path)
        size_mb = os.path.getsize(path) / 2**20
        totals, verifies = [], []
        for i in range(args.repeats):
            started = time.perf_counter()
            report = convert_checkpoint(path, os.path.join(tmp, f"out{i}.pkl"))
            totals.append(time.perf_counter() - started)
            verifies.append(report.verify_seconds)
        print(f"ResNet-{args.depth}, MoCo v2 layout, {size_mb:.0f} MiB checkpoint, torch threads "
              f"{torch.get_num_threads()}, {args.repeats} runs (the first includes one-time warm-up)")
        print(f"  convert+verify+write  median {statistics.median(totals):.2f} s   "
              f"runs {' '.join(f'{t:.2f}' for t in totals)}")
        print(f"  of which verification median {statistics.median(verifies):.2f} s   "
              f"runs {' '.join(f'{t:.2f}' for t in verifies)}")
        print(f"  tensors verified {report.verified}, max relative error {report.max_rel_error:.1e}")


if __name__ == "__main__":
    main()
