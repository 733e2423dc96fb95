"""What one training replica does, in plain PyTorch (no Ray; tests drive it directly): the packing of soft-target
rows into windows (packing.py), streamed through a bounded shuffle buffer (stream.py), the KD losses (losses.py)
and the whole objective (objective.py), the checkpointable train state with its optimizer, schedule and data
position (state.py), one data-parallel replica with its step metrics (replica.py), the checkpoint format
(checkpoint.py), model FLOPs and MFU (mfu.py), and the MoE expert-load metrics (expert_metrics.py).
`actors/trainer.py` runs a `Replica` in every Ray Train worker."""
