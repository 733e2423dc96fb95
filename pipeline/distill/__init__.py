"""Offline knowledge distillation: the teacher's soft targets as a dataset (targets.py); the losses that train
the student on them are in `pipeline/train/losses`. Plain PyTorch/pyarrow; the `distill` stage and `train` build
on these."""
