"""Training a classifier: losses, schedules, compiling, callbacks, BatchNorm calibration, one phase,
and cross-validation. Training knows nothing of run folders, the search or the CLI.
"""
