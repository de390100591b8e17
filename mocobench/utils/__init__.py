"""The ground floor: what every stage and the top may use (errors, file I/O, config loading, comm,
the detectron2 door, stop signals, run events, and the readers of the files stages hand each other).
It imports nothing above it: no stage (pretrain, convert, transfer, synth) and no top module."""
