"""Refine's finished iterations, kept so that a stage rerun after a crash continues at the last one.

`IterationStore` keeps `iter_NNNN/metrics.json` for every finished iteration and `state.pt` (weights and AdamW's
state) for the newest only. An iteration is finished once its folder exists: it is written under a temporary
name and renamed, so a save cut short leaves no iteration behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


class IterationStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def done(self) -> list[int]:
        return sorted(int(p.name[5:]) for p in self.root.glob("iter_[0-9][0-9][0-9][0-9]") if p.is_dir())

    def metrics(self, i: int) -> dict[str, Any]:
        return json.loads((self.root / f"iter_{i:04d}" / "metrics.json").read_text())

    def state(self, i: int) -> dict[str, Any]:
        import torch

        return torch.load(self.root / f"iter_{i:04d}" / "state.pt", weights_only=True)

    def save(self, i: int, state: dict[str, Any], metrics: dict[str, Any]) -> None:
        import torch

        tmp = self.root / f".iter_{i:04d}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        (tmp / "metrics.json").write_text(json.dumps(metrics, sort_keys=True))
        tmp.rename(self.root / f"iter_{i:04d}")
        for older in self.done():
            if older < i:
                (self.root / f"iter_{older:04d}" / "state.pt").unlink(missing_ok=True)


def drop_run(storage: str, run_name: str) -> None:
    """Remove the learner group's Ray Train run folder `run_name` under `storage` (a local folder or a pyarrow
    filesystem URI): the iterations kept in an `IterationStore` make it redundant, and a group of a stage attempt
    that died must start afresh, not resume it."""
    import pyarrow.fs as pafs

    from pipeline.artifacts import local_path

    local = local_path(storage)
    if local is not None:
        shutil.rmtree(local / run_name, ignore_errors=True)
        return
    fs, base = pafs.FileSystem.from_uri(storage.rstrip("/") + "/" + run_name)
    if fs.get_file_info(base).type != pafs.FileType.NotFound:
        fs.delete_dir(base)
