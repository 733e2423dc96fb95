"""The product's stages, in pipeline order: generate → distill → convert → train → refine → evaluate → register
(→ serve).

Each stage lives in its own module here (generate.py, distill.py, convert.py, train.py, refine.py, evaluate.py,
register.py, serve.py) and is listed in STAGES; the DAG is whatever is listed. Their contract, every artifact that
flows between them with its type, is artifact_specs.py; parquet_schemas.py holds the datasets' Parquet schemas and
row converters, results.py the typed results stored beside checkpoints and reports (and their MLflow metrics);
shards.py holds per-partition Parquet shards, the unit of retry and resume of the stages that fan out.
"""

from __future__ import annotations

from pipeline.stage import Stage
from pipeline.stages.convert import Convert
from pipeline.stages.distill import Distill
from pipeline.stages.evaluate import Evaluate
from pipeline.stages.generate import Generate
from pipeline.stages.refine import Refine
from pipeline.stages.register import Register
from pipeline.stages.serve import Serve
from pipeline.stages.train import Train

STAGES: list[type[Stage]] = [Generate, Distill, Convert, Train, Refine, Evaluate, Register, Serve]
