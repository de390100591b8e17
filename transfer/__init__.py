"""Stage 3: converted .pkl -> detectron2 fine-tuning on VOC/COCO with SyncBN -> AP
(`mocobench transfer`).

`run_transfer` and `main` live in transfer.run; they are loaded on first use so that modules of
this package that need no detectron2 (transfer.report) import without it.
"""
__all__ = ["main", "run_transfer"]


def __getattr__(name):
    if name in __all__:
        from transfer import run

        return getattr(run, name)
    raise AttributeError(f"module 'transfer' has no attribute {name!r}")
