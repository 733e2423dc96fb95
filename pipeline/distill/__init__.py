"""Offline knowledge distillation: the teacher's soft targets as a dataset (targets.py) and the losses that train
the student on them (losses.py). Plain PyTorch/pyarrow; the `distill` stage and `train` build on these."""
