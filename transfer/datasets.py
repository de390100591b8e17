"""Datasets for transfer: detectron2's builtin names, the generated (synth) ones, and checks before
training.

Builtin names are registered by detectron2 under `$DETECTRON2_DATASETS` (default ./datasets),
lazily: a missing file would only surface deep inside the first data loader. `check_datasets` looks
for every file a config's datasets need first and names the exact path and the expected layout. The
names of the MoCo paper's tasks:

    voc_2007_trainval, voc_2012_trainval, voc_2007_test        VOC detection (detectron2)
    coco_2017_train, coco_2017_val                             COCO detection / instance
                                                               segmentation (detectron2)
    keypoints_coco_2017_train, keypoints_coco_2017_val         COCO person keypoints (detectron2)
    lvis_v0.5_train, lvis_v0.5_val                             LVIS v0.5 instance segmentation
                                                               (detectron2)
    cityscapes_fine_{instance_seg,sem_seg}_{train,val}         Cityscapes fine (detectron2)
    voc_2012_sem_seg_train_aug, voc_2012_sem_seg_val           VOC semantic segmentation
                                                               (registered here: detectron2 has no
                                                               VOC segmentation dataset)

Generated datasets (`mocobench data synth --out DIR`) register under their own names so that any
config can point at them:

    synth_voc_trainval, synth_voc_test     DIR/VOC2007 (PASCAL VOC layout, class names from
                                           DIR/synth.json)
    synth_coco_train, synth_coco_val       DIR/coco/{train,val}2017 + annotations/instances_*.json
    synth_keypoints_train, _val            DIR/coco/{train,val}2017 +
                                           annotations/person_keypoints_*.json
    synth_lvis_train, synth_lvis_val       DIR/lvis/lvis_v0.5_*.json over the DIR/coco images
    synth_cityscapes_fine_{instance_seg,sem_seg}_{train,val}    DIR/cityscapes/{leftImg8bit,gtFine}
    synth_voc_2012_sem_seg_train_aug, synth_voc_2012_sem_seg_val  DIR/VOC2012
                                                                  (SegmentationClass[Aug])

DIR is, first match wins: `--synth-root DIR` (= config key MOCOBENCH.SYNTH_ROOT),
`$MOCOBENCH_SYNTH`, `$DETECTRON2_DATASETS/synth` (detectron2's default datasets root:
./datasets/synth).
"""
import logging
import os

from mocobench.utils import d2compat  # before any detectron2 import

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_lvis_json, register_coco_instances, register_pascal_voc
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.cityscapes import load_cityscapes_instances, load_cityscapes_semantic
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES

from mocobench.utils.errors import UsageError

logger = logging.getLogger(__name__)

SYNTH_PREFIX = "synth_"
SYNTH_ENV = "MOCOBENCH_SYNTH"
# name -> (format, split); paths come from the tree's synth.json
SYNTH_DATASETS = {
    "synth_voc_trainval": ("voc", "trainval"),
    "synth_voc_test": ("voc", "test"),
    "synth_coco_train": ("coco", "train"),
    "synth_coco_val": ("coco", "val"),
    "synth_keypoints_train": ("coco_keypoints", "train"),
    "synth_keypoints_val": ("coco_keypoints", "val"),
    "synth_lvis_train": ("lvis", "train"),
    "synth_lvis_val": ("lvis", "val"),
    "synth_cityscapes_fine_instance_seg_train": ("cityscapes_instance", "train"),
    "synth_cityscapes_fine_instance_seg_val": ("cityscapes_instance", "val"),
    "synth_cityscapes_fine_sem_seg_train": ("cityscapes_sem_seg", "train"),
    "synth_cityscapes_fine_sem_seg_val": ("cityscapes_sem_seg", "val"),
    "synth_voc_2012_sem_seg_train_aug": ("voc_sem_seg", "train_aug"),
    "synth_voc_2012_sem_seg_val": ("voc_sem_seg", "val"),
}

VOC_LAYOUT = (
    "{dirname}/\n"
    "  Annotations/<id>.xml\n"
    "  ImageSets/Main/{split}.txt   (one image id per line)\n"
    "  JPEGImages/<id>.jpg"
)
JSON_LAYOUT = (
    "{json_file}   (COCO / LVIS json)\n"
    "{image_root}/<file_name>   (the images it lists)"
)
CITYSCAPES_LAYOUT = (
    "{image_dir}/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
    "{gt_dir}/<city>/<city>_<seq>_<frame>_gtFine_{{polygons.json,labelIds.png,"
    "instanceIds.png,labelTrainIds.png}}\n"
    "(labelTrainIds.png: cityscapesscripts/preparation/createTrainIdLabelImgs.py)"
)
VOC_SEM_SEG_LAYOUT = (
    "{dirname}/\n"
    "  ImageSets/Segmentation/{split}.txt   (one image id per line; train_aug: VOC train + SBD, "
    "10582 ids)\n  JPEGImages/<id>.jpg\n"
    "  {label_dir}/<id>.png   (class index per pixel, 255 = ignore)"
)
VOC_SEM_SEG_IGNORE = 255

def datasets_root() -> str:
    return os.getenv("DETECTRON2_DATASETS", "datasets")

def resolve_synth_root(configured: str = "") -> str:
    return configured or os.getenv(SYNTH_ENV) or os.path.join(datasets_root(), "synth")

# --------------------------------------------------------------------------------------------------
# VOC semantic segmentation: the reader of VOC2012's ImageSets/Segmentation lists

def load_voc_sem_seg(dirname: str, split: str, label_dir: str) -> list:
    """detectron2 dicts (file_name, sem_seg_file_name, image_id) for the ids in
    ImageSets/Segmentation/{split}.txt.

    Labels are read as they are stored: SegmentationClass PNGs are palette images whose indices are
    the classes (what detectron2's SemSegEvaluator reads), SegmentationClassAug PNGs are greyscale
    with the same values.
    """
    with open(os.path.join(dirname, "ImageSets", "Segmentation", f"{split}.txt")) as f:
        ids = [line.strip() for line in f if line.strip()]
    return [{"file_name": os.path.join(dirname, "JPEGImages", f"{i}.jpg"),
             "sem_seg_file_name": os.path.join(dirname, label_dir, f"{i}.png"), "image_id": i}
            for i in ids]

def register_voc_sem_seg(name, dirname, split, label_dir, classes):
    DatasetCatalog.register(name, lambda: load_voc_sem_seg(dirname, split, label_dir))
    MetadataCatalog.get(name).set(dirname=dirname, split=split, label_dir=label_dir,
                                  stuff_classes=list(classes), ignore_label=VOC_SEM_SEG_IGNORE,
                                  evaluator_type="sem_seg")

# The paper trains on train_aug (VOC2012 train + SBD; DeepLab's greyscale SegmentationClassAug
# labels) and evaluates on val (VOC2012's palette SegmentationClass labels).
VOC_SEM_SEG_LABELS = {"train_aug": "SegmentationClassAug", "val": "SegmentationClass"}
VOC_SEM_SEG_SPLITS = {"voc_2012_sem_seg_train_aug": "train_aug", "voc_2012_sem_seg_val": "val"}

def register_builtin_voc_sem_seg(root: str):
    for name, split in VOC_SEM_SEG_SPLITS.items():
        if name not in DatasetCatalog.list():
            register_voc_sem_seg(name, os.path.join(root, "VOC2012"), split,
                                 VOC_SEM_SEG_LABELS[split], ["background", *VOC_CLASS_NAMES])

register_builtin_voc_sem_seg(datasets_root())

# --------------------------------------------------------------------------------------------------
# generated datasets: one registration function per format, (name, root, paths, split, class_names)
# -> None

def _cityscapes_dirs(root, paths, split):
    return (os.path.join(root, paths["cityscapes"], "leftImg8bit", split),
            os.path.join(root, paths["cityscapes"], "gtFine", split))

def _register_voc(name, root, paths, split, class_names, year):
    register_pascal_voc(name, os.path.join(root, paths["voc"]), split, year, class_names)
    # register_pascal_voc (v0.6) leaves evaluator_type unset; the builtin voc_* names set it
    # alongside
    MetadataCatalog.get(name).set(evaluator_type="pascal_voc")

def _register_coco(name, root, paths, split, class_names, year):
    register_coco_instances(name, {"thing_classes": list(class_names)},
                            os.path.join(root, paths[f"coco_{split}_json"]),
                            os.path.join(root, paths[f"coco_{split}_images"]))

def _register_coco_keypoints(name, root, paths, split, class_names, year):
    # detectron2's metadata of keypoints_coco_*: "person", the 17 keypoint names, their flip map
    # and colours
    register_coco_instances(name, _get_builtin_metadata("coco_person"),
                            os.path.join(root, paths[f"coco_keypoints_{split}_json"]),
                            os.path.join(root, paths[f"coco_{split}_images"]))

def _register_lvis(name, root, paths, split, class_names, year):
    # detectron2's register_lvis_instances looks the class names up by dataset name (lvis_v0.5_*:
    # the 1230 real ones); the generated classes come from synth.json, so the loader is called
    # without a name
    json_file = os.path.join(root, paths[f"lvis_{split}_json"])
    # "coco/": detectron2 appends "train2017/..."
    image_root = os.path.join(root, paths["lvis_image_root"])
    DatasetCatalog.register(name, lambda: load_lvis_json(json_file, image_root))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                  thing_classes=list(class_names), evaluator_type="lvis")

def _register_cityscapes_instance(name, root, paths, split, class_names, year):
    image_dir, gt_dir = _cityscapes_dirs(root, paths, split)
    DatasetCatalog.register(name, lambda: load_cityscapes_instances(image_dir, gt_dir,
                                                                    from_json=True,
                                                                    to_polygons=True))
    MetadataCatalog.get(name).set(image_dir=image_dir, gt_dir=gt_dir,
                                  evaluator_type="cityscapes_instance",
                                  **_get_builtin_metadata("cityscapes"))

def _register_cityscapes_sem_seg(name, root, paths, split, class_names, year):
    image_dir, gt_dir = _cityscapes_dirs(root, paths, split)
    DatasetCatalog.register(name, lambda: load_cityscapes_semantic(image_dir, gt_dir))
    MetadataCatalog.get(name).set(image_dir=image_dir, gt_dir=gt_dir,
                                  evaluator_type="cityscapes_sem_seg", ignore_label=255,
                                  **_get_builtin_metadata("cityscapes"))

def _register_voc_sem_seg(name, root, paths, split, class_names, year):
    register_voc_sem_seg(name, os.path.join(root, paths["voc_seg"]), split,
                         VOC_SEM_SEG_LABELS[split], ["background", *class_names])

SYNTH_REGISTRARS = {
    "voc": _register_voc,
    "coco": _register_coco,
    "coco_keypoints": _register_coco_keypoints,
    "lvis": _register_lvis,
    "cityscapes_instance": _register_cityscapes_instance,
    "cityscapes_sem_seg": _register_cityscapes_sem_seg,
    "voc_sem_seg": _register_voc_sem_seg,
}

def register_synth_datasets(root: str) -> dict:
    """Register the synth_* names for the tree at `root` (re-registering if they pointed
    elsewhere)."""
    from mocobench.utils.synth_meta import read_synth_meta

    root = os.path.abspath(root)
    meta = read_synth_meta(root)  # UsageError naming DIR/synth.json when it is not a generated tree
    for name, (fmt, split) in SYNTH_DATASETS.items():
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("synth_root", None) == root:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        SYNTH_REGISTRARS[fmt](name, root, meta["paths"], split, meta["class_names"],
                              meta["voc_year"])
        MetadataCatalog.get(name).set(synth_root=root)
    return meta

def dataset_names(cfg) -> list:
    return list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)

def uses_synth(cfg) -> bool:
    return any(n.startswith(SYNTH_PREFIX) for n in dataset_names(cfg))

def _missing_paths(paths):
    return [p for p in paths if not os.path.exists(p)]

# --------------------------------------------------------------------------------------------------
# checks before training

def _current_paths(name, meta):
    """The dataset's paths: a detectron2 builtin name (and our VOC segmentation ones) under
    $DETECTRON2_DATASETS as it is now (detectron2 registered them under its value at import), every
    other dataset as registered."""
    if meta.get("synth_root", None):
        return dict(meta.as_dict())
    paths = d2compat.builtin_dataset_paths(name, datasets_root())
    if paths is None and name in VOC_SEM_SEG_SPLITS:
        paths = {"dirname": os.path.join(datasets_root(), "VOC2012")}
    return {**meta.as_dict(), **(paths or {})}


def _expected_files(meta):
    """(paths that must exist, layout text) for a dataset's metadata (a dict), or None for a family
    we cannot check."""
    if meta.get("evaluator_type") == "pascal_voc" and meta.get("dirname"):
        dirname, split = meta["dirname"], meta["split"]
        return ([os.path.join(dirname, "ImageSets", "Main", f"{split}.txt"),
                 os.path.join(dirname, "Annotations"),
                 os.path.join(dirname, "JPEGImages")],
                VOC_LAYOUT.format(dirname=dirname, split=split))
    if meta.get("label_dir"):
        dirname, split, label_dir = meta["dirname"], meta["split"], meta["label_dir"]
        return ([os.path.join(dirname, "ImageSets", "Segmentation", f"{split}.txt"),
                 os.path.join(dirname, "JPEGImages"),
                 os.path.join(dirname, label_dir)],
                VOC_SEM_SEG_LAYOUT.format(dirname=dirname, split=split, label_dir=label_dir))
    if meta.get("json_file"):
        return [meta["json_file"], meta["image_root"]], JSON_LAYOUT.format(
            json_file=meta["json_file"], image_root=meta["image_root"])
    if meta.get("gt_dir"):
        return [meta["image_dir"], meta["gt_dir"]], CITYSCAPES_LAYOUT.format(
            image_dir=meta["image_dir"], gt_dir=meta["gt_dir"])
    return None


def _first_id(list_file):
    with open(list_file) as f:
        return next((line.split()[0] for line in f if line.strip()), None)


def _image_problem(path):
    """Why the image at `path` cannot be read (None: it opens)."""
    from PIL import Image

    if not os.path.isfile(path):
        return "does not exist"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:  # noqa: BLE001 - PIL's many errors all mean "not an image"
        return f"does not open as an image ({type(e).__name__}: {e})"
    return None


# how far into a COCO / LVIS json the first image entry is looked for: its "images" come before the
# annotations in COCO's and LVIS's files; a whole train json (~450 MB) is not parsed here
_JSON_HEAD_BYTES = 4 << 20


def _first_json_image(meta):
    """The first image a COCO / LVIS json lists, where detectron2's loader will look for it (LVIS:
    image_root + the split folder of its coco_url), from the file's head; None when the head lists
    none."""
    import re

    with open(meta["json_file"], "rb") as f:
        head = f.read(_JSON_HEAD_BYTES).decode("utf-8", "replace")
    if meta.get("evaluator_type") == "lvis":
        found = re.search(r'"coco_url"\s*:\s*"([^"]+)"', head)
        if found:  # detectron2.data.datasets.lvis.get_file_name
            split_folder, file_name = found.group(1).split("/")[-2:]
            return os.path.join(meta["image_root"] + split_folder, file_name)
    found = re.search(r'"file_name"\s*:\s*"([^"]+)"', head)
    return os.path.join(meta["image_root"], found.group(1)) if found else None


def _cityscapes_first(meta, task):
    """(first image, its ground-truth file) of a Cityscapes split, or (None, folder) when the split
    holds no image."""
    image_dir = meta["image_dir"]
    for city in sorted(e.name for e in os.scandir(image_dir) if e.is_dir()):
        images = sorted(f for f in os.listdir(os.path.join(image_dir, city))
                        if f.endswith("_leftImg8bit.png"))
        if images:
            base = images[0][:-len("leftImg8bit.png")]
            # what detectron2's loaders read: polygons (instance, from_json) or train ids (sem_seg)
            gt = "gtFine_polygons.json" if task == "cityscapes_instance" else \
                "gtFine_labelTrainIds.png"
            return (os.path.join(image_dir, city, images[0]),
                    os.path.join(meta["gt_dir"], city, base + gt))
    return None, image_dir


def _content_problem(meta):
    """(path, what is wrong) for the first sample of a dataset whose folders exist: its list of
    ids, its annotation and one image that opens; None when they are fine."""
    kind = meta.get("evaluator_type")
    if kind == "pascal_voc" or meta.get("label_dir"):
        folder = "Main" if kind == "pascal_voc" else "Segmentation"
        list_file = os.path.join(meta["dirname"], "ImageSets", folder, f"{meta['split']}.txt")
        first = _first_id(list_file)
        if first is None:
            return list_file, "lists no image id"
        label = (os.path.join(meta["dirname"], "Annotations", f"{first}.xml")
                 if kind == "pascal_voc" else
                 os.path.join(meta["dirname"], meta["label_dir"], f"{first}.png"))
        if not os.path.isfile(label):
            return label, f"does not exist (the annotation of {first}, the first id of {list_file})"
        image = os.path.join(meta["dirname"], "JPEGImages", f"{first}.jpg")
        problem = _image_problem(image)
        return (image, problem) if problem else None
    if meta.get("json_file"):
        if not os.path.isfile(meta["json_file"]):
            return meta["json_file"], "is not a file"
        image = _first_json_image(meta)
        problem = image and _image_problem(image)
        return (image, f"{problem} (the first image {meta['json_file']} lists)") if problem \
            else None
    if meta.get("gt_dir"):
        image, gt = _cityscapes_first(meta, kind)
        if image is None:
            return gt, "holds no <city>/*_leftImg8bit.png"
        problem = _image_problem(image)
        if problem:
            return image, problem
        if not os.path.isfile(gt):
            return gt, f"does not exist (the ground truth of {os.path.basename(image)})"
    return None


def check_dataset(name: str, training: bool = False):
    """Raise UsageError naming the missing or broken path and the expected layout (detectron2 would
    fail much later): the dataset's folders and files, then its first sample (the id list, its
    annotation, an image that opens)."""
    if name not in DatasetCatalog.list():
        voc = sorted(n for n in DatasetCatalog.list() if n.startswith("voc_"))
        raise UsageError(
            f"dataset {name!r} is not registered. PASCAL VOC names: {', '.join(voc)}; COCO: "
            "coco_2017_train, coco_2017_val, keypoints_coco_2017_train, ...; LVIS: "
            "lvis_v0.5_train, lvis_v0.5_val; Cityscapes: cityscapes_fine_instance_seg_train, "
            f"cityscapes_fine_sem_seg_train, ...; generated data: {', '.join(SYNTH_DATASETS)} "
            f"(with --synth-root DIR or ${SYNTH_ENV})"
        )
    registered = MetadataCatalog.get(name)
    meta = _current_paths(name, registered)
    where = (f"generated dataset root {meta['synth_root']!r}" if meta.get("synth_root")
             else f"DETECTRON2_DATASETS={datasets_root()!r}")
    expected = _expected_files(meta)
    if expected is None:
        # a dataset family without files we know how to check: detectron2 reports its own errors
        return
    paths, layout = expected
    missing = _missing_paths(paths)
    broken = (missing[0], "does not exist") if missing else _content_problem(meta)
    if broken:
        raise UsageError(
            f"dataset {name!r}: {broken[0]!r} {broken[1]} ({where}). Expected "
            f"layout:\n{layout}\nNothing is downloaded here: put the data there, or point "
            "DETECTRON2_DATASETS at its root."
        )
    if training and meta.get("label_dir"):
        _check_training_labels(name, meta)

def _check_training_labels(name, meta):
    """detectron2's DatasetMapper reads sem_seg_file_name as a greyscale ("L") image: a palette PNG
    would be converted through its colours, and the network would learn luminances instead of class
    indices."""
    from PIL import Image

    first = load_voc_sem_seg(meta["dirname"], meta["split"], meta["label_dir"])[:1]
    if first:
        with Image.open(first[0]["sem_seg_file_name"]) as image:
            mode = image.mode
        if mode not in ("L", "I;16"):
            raise UsageError(
                f"dataset {name!r}: {first[0]['sem_seg_file_name']!r} is a {mode!r} PNG; training "
                "reads labels as greyscale class indices (detectron2's DatasetMapper converts to "
                "'L'), so a palette PNG would train on its colours' luminance. Train on greyscale "
                "labels (VOC: SegmentationClassAug)")

def check_datasets(cfg):
    training = set(cfg.DATASETS.TRAIN)
    for name in dict.fromkeys(dataset_names(cfg)):
        check_dataset(name, training=name in training)

# what each meta architecture predicts: (metadata key, config key that must equal its length)
CLASS_KEYS = {
    "GeneralizedRCNN": ("thing_classes", "MODEL.ROI_HEADS.NUM_CLASSES"),
    "SemanticSegmentor": ("stuff_classes", "MODEL.SEM_SEG_HEAD.NUM_CLASSES"),
}

def check_num_classes(cfg) -> list:
    """The model's class count must match the datasets' classes; returns log lines for what it
    changed.

    For generated data the class count is a generation parameter, so it is taken from synth.json
    (logged); for everything else a mismatch is the user's error and is reported.
    """
    if cfg.MODEL.META_ARCHITECTURE not in CLASS_KEYS:
        return []
    meta_key, cfg_key = CLASS_KEYS[cfg.MODEL.META_ARCHITECTURE]
    node_path, leaf = cfg_key.rsplit(".", 1)
    node = cfg
    for part in node_path.split("."):
        node = node[part]
    notes = []
    for name in dict.fromkeys(dataset_names(cfg)):
        classes = MetadataCatalog.get(name).get(meta_key, None)
        if classes is None or len(classes) == node[leaf]:
            continue
        if name.startswith(SYNTH_PREFIX):
            notes.append(f"{cfg_key} {node[leaf]} -> {len(classes)} (the classes of generated "
                         f"dataset {name!r})")
            node[leaf] = len(classes)
        else:
            raise UsageError(f"{cfg_key} is {node[leaf]} but dataset {name!r} has {len(classes)} "
                             "classes")
    return notes
