"""How long `mocobench convert` takes, per phase, on a ResNet in the official MoCo v2 layout
(random weights).

    python benchmarks/convert_speed.py [--arch resnet50] [--to detectron2|torchvision] [--repeats 3]

--arch is any torchvision ResNet builder the converter takes (resnet18 ... resnet152,
resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2). Prints
wall and CPU seconds of reading + finding the trunk, of verification, and of the whole conversion
(reading, verifying, writing the output, its sha256 and OUT.json).
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
from convert.arch import TORCHVISION_NAMES  # noqa: E402
from convert.sources import extract_trunk, read_checkpoint  # noqa: E402


def moco_checkpoint(arch):
    trunk = {k: v for k, v in getattr(torchvision.models, arch)().state_dict().items()
             if not k.startswith("fc.")}
    width = trunk["layer4.0.conv1.weight"].shape[1] * 2 if "layer4.0.conv3.weight" in trunk else 512
    head = {"fc.0.weight": torch.randn(width, width), "fc.0.bias": torch.zeros(width),
            "fc.2.weight": torch.randn(128, width), "fc.2.bias": torch.zeros(128)}
    state = {"module.encoder_q." + k: v for k, v in {**trunk, **head}.items()}
    state.update({"module.encoder_k." + k: v.clone() for k, v in {**trunk, **head}.items()})
    state["module.queue"] = torch.randn(128, 65536)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": arch, "state_dict": state,
            "optimizer": {"state": {}, "param_groups": []}}


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def line(label, walls, cpus):
    return (f"  {label:<24} wall median {statistics.median(walls):6.2f} s   cpu median "
            f"{statistics.median(cpus):6.2f} s   wall runs {' '.join(f'{t:.2f}' for t in walls)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50",
                        choices=sorted(set(TORCHVISION_NAMES.values())))
    parser.add_argument("--to", default="detectron2", choices=["detectron2", "torchvision"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    suffix = ".pkl" if args.to == "detectron2" else ".pth"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint_0199.pth.tar")
        torch.save(moco_checkpoint(args.arch), path)
        size_mb = os.path.getsize(path) / 2**20
        find, whole, verify = ([], []), ([], []), []
        for i in range(args.repeats):
            out = os.path.join(tmp, f"out{i}{suffix}")
            _, wall, cpu = timed(lambda: extract_trunk(read_checkpoint(path)))
            find[0].append(wall)
            find[1].append(cpu)
            report, wall, cpu = timed(lambda out=out: convert_checkpoint(path, out, to=args.to))
            whole[0].append(wall)
            whole[1].append(cpu)
            verify.append(report.verify_seconds)
        print(f"{report.arch.name} ({args.arch}), MoCo v2 layout, {size_mb:.0f} MiB checkpoint -> "
              f"{args.to}, torch threads {torch.get_num_threads()}, {args.repeats} runs (the first "
              "includes warm-up)")
        print(line("read + find trunk", *find))
        print(f"  {'verification':<24} wall median {statistics.median(verify):6.2f} s")
        print(line("whole conversion", *whole))
        print(f"  tensors verified {report.verified}, max relative error "
              f"{report.max_rel_error:.1e}")


if __name__ == "__main__":
    main()
