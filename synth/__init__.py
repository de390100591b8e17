"""The data generator (a stage): small datasets in the real on-disk formats, `mocobench data synth`."""
