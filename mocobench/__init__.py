"""Shared pieces of mocobench: the command line, the detectron2 compatibility layer, generated data,
safe checkpoint I/O and distributed helpers. The stages live in the `pretrain`, `convert` and
`transfer` packages; data flows one way between them."""

__version__ = "0.1.0"
