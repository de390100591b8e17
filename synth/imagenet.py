"""The ImageNet stand-in for pretraining: one object per image, in torchvision's ImageFolder layout.

Each image draws from (seed, split, class, index) alone, so a class's images do not depend on how
many classes are asked for.
"""
import os

from mocobench.utils.synth_meta import CLASS_NAMES
from synth.raster import (
    STREAM_TRAIN,
    STREAM_VAL,
    class_list,
    encode_jpeg,
    render_object_image,
    seeded_rng,
    write_bytes,
)


def make_imagenet(out_dir, classes, images_per_class, val_per_class, size, seed):
    """Write DIR/imagenet/{train,val}/<class>/<class>_NNNNN.jpg; returns {"train": n, "val": n}."""
    names = class_list(classes)
    counts = {}
    for split, per_class, stream in (("train", images_per_class, STREAM_TRAIN),
                                     ("val", val_per_class, STREAM_VAL)):
        for name in names:
            class_dir = os.path.join(out_dir, "imagenet", split, name)
            os.makedirs(class_dir, exist_ok=True)
            class_index = CLASS_NAMES.index(name)
            for i in range(per_class):
                img = render_object_image(name, size, seeded_rng(seed, stream, class_index, i))
                write_bytes(os.path.join(class_dir, f"{name}_{i:05d}.jpg"), encode_jpeg(img))
        counts[split] = per_class * len(names)
    return counts
