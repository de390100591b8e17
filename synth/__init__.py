"""The data generator (a stage): small datasets in the real on-disk formats.

`mocobench data synth` (cli) -> generate.synthesize, the whole tree; one module per format
(imagenet, voc, coco, cityscapes) over the shared drawing (raster) and the parameters (presets).
"""
