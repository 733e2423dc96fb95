"""Ray roles, one file each, as thin Ray wrappers around plain classes that tests call without Ray:
teacher.py (a loaded teacher generating or scoring partitions), student.py (a loaded student answering or sampling
rollouts), trainer.py (every Ray Train worker one training `Replica`), learner.py (`refine`'s learner group),
server.py (the OpenAI-compatible app as a Ray Serve deployment), and the helpers they share: pool.py (a small
actor group: placement, bounded fan-out, recovery from dead actors) and object_store.py (tensors through the
object store without a copy per reader).

Stages create these actors from inside their Ray task; nothing here is imported by the driver.
"""
