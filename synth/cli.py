"""`mocobench data synth --out DIR`: the command line of the data generator.

Its own argparse parser (the `mocobench` dispatcher hands it argv) and a summary of what was
written or reused; the work is generate.synthesize.
"""
import argparse
import os
import sys
import time

from mocobench.utils.synth_meta import CLASS_NAMES, META_FILE
from synth.generate import synthesize
from synth.presets import DEFAULT_PRESET, MIN_SCENE_SIZE, MIN_SIZE, PRESETS
from synth.voc import VOC_SEG_YEAR


def _build_parser():
    parser = argparse.ArgumentParser(prog="mocobench data",
                                     description="Generated datasets in the real formats.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    synth = actions.add_parser(
        "synth", help="write ImageNet-style, VOC, COCO (+ keypoints), LVIS and Cityscapes trees of "
                      "shape images",
        description="Write DIR/imagenet/{train,val}, DIR/VOC2007, DIR/VOC2012 (segmentation), "
                    "DIR/coco (instances and person keypoints), DIR/lvis, DIR/cityscapes and "
                    "DIR/synth.json. Explicit flags override the preset: " + "; ".join(
                        f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items())
                        for name, p in PRESETS.items()))
    synth.add_argument("--out", required=True,
                       help="output directory (empty, new, or a tree with the same params)")
    synth.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                       help=f"size defaults (default: {DEFAULT_PRESET}, the size the shipped CPU "
                            "configs are made for; test: a tiny tree for tests)")
    synth.add_argument("--seed", type=int, default=0,
                       help="same seed and sizes -> byte-identical files")
    synth.add_argument("--classes", type=int,
                       help=f"number of shape classes (2..{len(CLASS_NAMES)})")
    synth.add_argument("--images-per-class", type=int, help="ImageNet train images per class")
    synth.add_argument("--val-per-class", type=int,
                       help="ImageNet val images per class (default: a fifth, >= 2)")
    synth.add_argument("--scenes", type=int,
                       help="detection scenes (a quarter -> VOC test / COCO val)")
    synth.add_argument("--size", type=int, help=f"object image side in px (>= {MIN_SIZE})")
    synth.add_argument("--scene-size", type=int,
                       help=f"scene image side in px (>= {MIN_SCENE_SIZE})")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace an existing generated tree in --out")
    return parser


def main(argv):
    parser = _build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on bad flags itself
    if args.action != "synth":
        parser.print_help(sys.stderr)
        return 2
    start = time.perf_counter()
    before = os.path.isfile(os.path.join(args.out, META_FILE))
    meta = synthesize(
        args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite,
        classes=args.classes, images_per_class=args.images_per_class,
        val_per_class=args.val_per_class, scenes=args.scenes, size=args.size,
        scene_size=args.scene_size)
    seconds = time.perf_counter() - start
    s = meta["splits"]
    verb = "reused" if before and not args.overwrite else f"wrote in {seconds:.1f} s"
    print(f"{args.out}: {verb} (preset {meta['preset']}, seed {meta['seed']})")
    print(f"  classes ({meta['num_classes']}): {', '.join(meta['class_names'])}")
    print(f"  imagenet/       {s['imagenet']['train']} train + {s['imagenet']['val']} val images, "
          f"{meta['size']} px ({meta['images_per_class']} + {meta['val_per_class']} per class)")
    print(f"  VOC{meta['voc_year']}/        {s['voc']['trainval']} trainval + {s['voc']['test']} "
          f"test scenes, {meta['scene_size']} px")
    print(f"  coco/           {s['coco']['train']} train2017 + {s['coco']['val']} val2017 scenes "
          "(same images as VOC)")
    print(f"                  {meta['objects']['train']} + {meta['objects']['test']} annotated "
          "objects")
    print(f"                  + {s['coco_keypoints']['train']} + {s['coco_keypoints']['val']} "
          "person scenes (person_keypoints_*.json, 17 COCO keypoints)")
    print(f"  lvis/           LVIS v0.5 json of the coco/ scenes ({s['lvis']['train']} train + "
          f"{s['lvis']['val']} val)")
    print(f"  cityscapes/     {s['cityscapes']['train']} train + {s['cityscapes']['val']} val "
          f"street scenes ({meta['scene_size']}x{meta['scene_size'] // 2} px, leftImg8bit + "
          "gtFine)")
    print(f"  VOC{VOC_SEG_YEAR}/        {s['voc_seg']['train_aug']} train_aug + "
          f"{s['voc_seg']['val']} val segmentation labels (the VOC2007 scenes)")
    print(f"  {META_FILE}      class names, seed, sizes and preset for the later stages")
    return 0
