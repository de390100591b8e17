"""Read a pretraining checkpoint and find the ResNet trunk inside it.

A checkpoint is one of a small family of layouts (`SOURCES`): the MoCo v1/v2 query encoder, the MoCo v3
base encoder, or a plain torchvision ResNet. Each layout names the prefix its trunk lives under and what the
other top-level entries are (key encoder, queue, predictor), so the converter can say why it dropped them.

Nothing here imports detectron2: reading and checking the input is cheap and runs before any model is built.
"""
import collections
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from mocobench.errors import UsageError
from mocobench.fileio import load_checkpoint, safe_unpickle


@dataclass(frozen=True)
class Source:
    """One checkpoint layout: where the trunk lives and what everything else in the file is."""

    name: str
    author: str  # the pkl's "__author__"
    encoder_prefixes: Tuple[str, ...]  # the trunk's keys are PREFIX + torchvision name; first match wins
    head: str  # what `fc.*` under the encoder is
    others: Dict[str, str] = field(default_factory=dict)  # key prefix outside the encoder -> what it is


SOURCES = {
    source.name: source
    for source in [
        # official MoCo v1/v2 (main_moco.py saves the DDP-wrapped model) and ours; `encoder_q.` when saved unwrapped
        Source(
            "moco",
            "MOCO",
            ("module.encoder_q.", "encoder_q."),
            head="projection head (MoCo v1 linear fc / v2 MLP fc.0, fc.2)",
            others={
                "module.encoder_k.": "key (momentum) encoder",
                "encoder_k.": "key (momentum) encoder",
                "module.queue_ptr": "queue pointer",
                "queue_ptr": "queue pointer",
                "module.queue": "queue of negative keys",
                "queue": "queue of negative keys",
            },
        ),
        # official MoCo v3 ResNet (moco-v3 main_moco.py): base encoder with its projector in fc.*
        Source(
            "moco-v3",
            "MOCO",
            ("module.base_encoder.", "base_encoder."),
            head="projector (fc.*)",
            others={
                "module.momentum_encoder.": "momentum encoder",
                "momentum_encoder.": "momentum encoder",
                "module.predictor.": "predictor",
                "predictor.": "predictor",
            },
        ),
        # a supervised baseline: torchvision's own resnet50-*.pth, or a classifier saved from DDP (`module.`)
        Source("torchvision", "torchvision", ("", "module."), head="ImageNet classifier (fc)"),
    ]
}


# depth -> (block, blocks per stage layer1..layer4): torchvision's resnet18 ... resnet152
RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

# a trunk key: the stem (conv1, bn1) or a block of layer1..layer4
_TRUNK_KEY = re.compile(r"^(conv1\.|bn1\.|layer[1-4]\.\d+\.)")
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


@dataclass
class Trunk:
    """The ResNet trunk found in a checkpoint, in torchvision names, plus what was left out and why."""

    source: str
    author: str
    prefix: str  # the encoder prefix the trunk was found under
    depth: int
    block: str  # "basic" or "bottleneck"
    state: Dict[str, torch.Tensor]  # torchvision name -> tensor (trunk only, no num_batches_tracked)
    original_keys: Dict[str, str]  # torchvision name -> key in the checkpoint
    dropped: List[Tuple[str, str]]  # (key in the checkpoint, why it is not converted)


def read_checkpoint(path):
    """The checkpoint's state dict (name -> tensor), never running code from the file."""
    path = os.fspath(path)
    if path.endswith(".pkl"):
        obj = safe_unpickle(path)
    else:
        try:
            obj = load_checkpoint(path)
        except (IndexError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            # torch's weights-only unpickler fails this way on some non-checkpoint bytes (e.g. a text file)
            raise UsageError(f"{path!r} is not a readable torch checkpoint (truncated or another format?): "
                             f"{type(e).__name__}: {e}") from None
    return _state_dict_of(obj, path)


def _state_dict_of(obj, path):
    if not isinstance(obj, dict):
        raise UsageError(f"{path!r} is not a checkpoint: it holds a {type(obj).__name__}, expected a dict of tensors")
    # official MoCo and ours: {"epoch", "arch", "state_dict", "optimizer"}; classifiers often {"model": ...}
    for entry in ("state_dict", "model"):
        if isinstance(obj.get(entry), dict):
            obj = obj[entry]
            break
    state = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            state[str(key)] = value
        elif type(value).__module__ == "numpy" and hasattr(value, "shape"):  # a .pkl of numpy arrays
            state[str(key)] = torch.as_tensor(value)
    if not state:
        entries = ", ".join(sorted(map(str, obj))[:10]) or "nothing"
        raise UsageError(f"{path!r} holds no tensors (found entries: {entries}); expected a model checkpoint")
    return state


def key_prefixes(keys, limit=12):
    """'module.encoder_q (320), module.queue (1)': what a checkpoint holds, for error messages."""
    counts = collections.Counter()
    for key in keys:
        parts = key.split(".")
        depth = 2 if parts[0] == "module" and len(parts) > 2 else 1
        counts[".".join(parts[:depth])] += 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))  # most keys first, then by name
    shown = [f"{prefix} ({n})" for prefix, n in ranked[:limit]]
    if len(counts) > limit:
        shown.append(f"... {len(counts) - limit} more")
    return ", ".join(shown)


def _encoder_prefix(source, keys):
    """The source's encoder prefix that holds a ResNet stem in `keys`, or None."""
    for prefix in source.encoder_prefixes:
        if prefix + "conv1.weight" in keys:
            return prefix
    return None


def detect_source(state, requested="auto", path="checkpoint"):
    """(Source, encoder prefix) of a state dict; UsageError naming what was found when nothing fits."""
    keys = set(state)
    if requested != "auto":
        if requested not in SOURCES:
            raise UsageError(f"unknown --source {requested!r}; expected auto or one of {', '.join(SOURCES)}")
        candidates = [SOURCES[requested]]
    else:
        candidates = list(SOURCES.values())
    found = [(source, _encoder_prefix(source, keys)) for source in candidates]
    found = [(source, prefix) for source, prefix in found if prefix is not None]
    if not found:
        expected = "; ".join(
            f"{s.name}: {' or '.join(repr(p + 'conv1.weight') for p in s.encoder_prefixes)}" for s in candidates
        )
        raise UsageError(
            f"{path!r} is not a ResNet checkpoint of a known layout. It holds keys under: {key_prefixes(keys)}. "
            f"Expected a ResNet stem at {expected}"
        )
    if len(found) > 1:
        names = ", ".join(source.name for source, _ in found)
        raise UsageError(f"{path!r} matches several layouts ({names}); choose one with --source")
    return found[0]


def detect_depth(trunk_keys, path="checkpoint"):
    """(depth, block) from the number of blocks in layer1..layer4 and whether blocks have a conv3."""
    blocks = collections.defaultdict(set)
    for key in trunk_keys:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks[int(match.group(1))].add(int(match.group(2)))
    per_stage = tuple(len(blocks[stage]) for stage in (1, 2, 3, 4))
    block = "bottleneck" if "layer1.0.conv3.weight" in trunk_keys else "basic"
    for depth, spec in RESNET_DEPTHS.items():
        if spec == (block, per_stage):
            return depth, block
    known = ", ".join(f"R{d}: {b} {s}" for d, (b, s) in RESNET_DEPTHS.items())
    raise UsageError(
        f"{path!r}: the trunk has {block} blocks per stage {per_stage}, which is no ResNet depth we convert ({known})"
    )


def _reference_state_dict(depth):
    """torchvision resnet{depth}'s state dict on the meta device: names and shapes, no memory, no init cost."""
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, f"resnet{depth}")()
    return model.state_dict()


def extract_trunk(state, source="auto", path="checkpoint"):
    """Find, check and return the ResNet trunk of a state dict (see `Trunk`)."""
    source, prefix = detect_source(state, source, path)
    encoder = {key[len(prefix):]: key for key in state if key.startswith(prefix)}
    trunk_names = [name for name in encoder if _TRUNK_KEY.match(name)]
    depth, block = detect_depth(trunk_names, path)

    reference = _reference_state_dict(depth)
    expected = {name for name in reference if not name.startswith("fc.")}
    required = {name for name in expected if not name.endswith("num_batches_tracked")}
    missing = sorted(required - set(encoder))
    if missing:
        raise UsageError(
            f"{path!r}: the ResNet-{depth} trunk under {prefix!r} lacks {len(missing)} tensor(s): "
            f"{', '.join(prefix + name for name in missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    unknown = sorted(name for name in encoder if name not in expected and not name.startswith("fc."))
    if unknown:
        raise UsageError(
            f"{path!r}: the encoder under {prefix!r} holds tensors a torchvision ResNet-{depth} does not have "
            f"(not a plain ResNet?): {', '.join(prefix + name for name in unknown[:8])}"
            f"{' ...' if len(unknown) > 8 else ''}"
        )
    for name in sorted(required):
        got, want = tuple(state[encoder[name]].shape), tuple(reference[name].shape)
        if got != want:
            raise UsageError(
                f"{path!r}: {encoder[name]!r} has shape {got}, a torchvision ResNet-{depth} has {want} "
                "(wide ResNets and ResNeXt are not supported)"
            )

    trunk_state, original_keys, dropped = {}, {}, []
    for key in state:
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name in required:
            trunk_state[name] = state[key]
            original_keys[name] = key
        elif name is not None and name.startswith("fc."):
            dropped.append((key, source.head))
        elif name is not None and name.endswith("num_batches_tracked"):
            dropped.append((key, "BN num_batches_tracked (detectron2 has no such buffer)"))
        else:
            dropped.append((key, _what_is(key, source)))
    return Trunk(source.name, source.author, prefix, depth, block, trunk_state, original_keys, dropped)


def _what_is(key, source):
    # longest matching prefix first: "module.queue_ptr" is the pointer, not the queue
    for prefix in sorted(source.others, key=len, reverse=True):
        if key == prefix or key.startswith(prefix if prefix.endswith(".") else prefix + "."):
            return source.others[prefix]
    return "not part of the encoder"
