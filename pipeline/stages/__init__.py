"""The product's stages, in pipeline order: generate → distill → convert → train → refine → evaluate → register
(→ serve).

Each stage lives in its own module here and is listed in STAGES once it is built; a stage that is not built yet
is simply absent, and the DAG is whatever is listed.
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
