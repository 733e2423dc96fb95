"""What one training replica does, in plain PyTorch (no Ray; tests drive it directly): the packing of soft-target
rows into windows (packing.py), streamed through a bounded shuffle buffer (stream.py), the KD losses (losses.py)
and the whole objective (objective.py), the checkpointable train state with its optimizer, schedule and data
position (state.py), one data-parallel replica with its step metrics (replica.py), a worker's run of it to
`max_steps` with validation and rank 0's MLflow step log (loop.py), the checkpoint format (checkpoint.py), model
FLOPs and MFU (mfu.py), and the MoE expert-load metrics (expert_metrics.py); each rank's rows of the Parquet shards
(parquet_rows.py), the held-out share for validation (split.py), and FSDP2 sharding (fsdp.py). `refine`'s learner:
the prompts an iteration draws, the student's samples and their rewards (rollouts.py), its losses on them
(policy_losses.py), one rank's update (policy_learner.py), and the finished iterations kept for a resumed stage
(iteration_store.py). `actors/trainer.py` runs `loop.py` in every Ray Train worker, `actors/learner.py` a
`PolicyLearner`."""
