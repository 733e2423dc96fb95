"""The stage DAG: edges come from artifact names (an input is the output of exactly one upstream stage)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pipeline.config import SECTIONS
from pipeline.stage import Stage


class DagError(ValueError):
    """The stages do not form a valid pipeline, or a selection names an unknown stage."""


class Dag:
    """Stages in a valid execution order (topological; declaration order breaks ties)."""

    def __init__(self, stages: Sequence[Stage]):
        self.stages = list(stages)
        names = [s.name for s in self.stages]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise DagError(f"duplicate stage names: {', '.join(dupes)}")
        self.producer: dict[str, str] = {}
        for s in self.stages:
            bad = [sec for sec in s.config_sections if sec not in SECTIONS]
            if bad:
                raise DagError(f"stage {s.name!r} reads unknown config sections {bad}; known: {SECTIONS}")
            for spec in s.outputs:
                if spec.name in self.producer:
                    raise DagError(
                        f"artifact {spec.name!r} is produced by both {self.producer[spec.name]!r} and {s.name!r}"
                    )
                self.producer[spec.name] = s.name
        for s in self.stages:
            for name in s.inputs:
                if name not in self.producer:
                    raise DagError(f"stage {s.name!r} needs artifact {name!r}, which no stage produces")
        self.order = self._toposort()

    def _toposort(self) -> list[Stage]:
        by_name = {s.name: s for s in self.stages}
        deps = {s.name: {self.producer[i] for i in s.inputs} for s in self.stages}
        done: list[str] = []
        while len(done) < len(self.stages):
            ready = [s.name for s in self.stages if s.name not in done and deps[s.name] <= set(done)]
            if not ready:
                cycle = sorted(set(by_name) - set(done))
                raise DagError(f"stages form a cycle: {', '.join(cycle)}")
            done.append(ready[0])
        return [by_name[n] for n in done]

    def __getitem__(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise DagError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in self.order) or 'none'}")

    def upstream(self, name: str) -> list[str]:
        """Direct producers of a stage's inputs."""
        return sorted({self.producer[i] for i in self[name].inputs})

    def upstream_among(self, name: str, present: Iterable[str]) -> list[str]:
        """The producers of a stage's inputs among `present`, seen through absent stages that pass an input on
        (`Stage.passthrough`: with `refine` off, `evaluate` follows `train`)."""
        present, out = set(present), set()
        todo = [self.producer[i] for i in self[name].inputs]
        while todo:
            up = todo.pop()
            if up in present:
                out.add(up)
            else:
                todo.extend(self.producer[source] for _, source in self[up].passthrough)
        return sorted(out)

    def downstream(self, names: Iterable[str]) -> set[str]:
        """The given stages and everything that depends on them, transitively."""
        result = {self[n].name for n in names}
        for s in self.order:  # topological order: one pass suffices
            if any(self.producer[i] in result for i in s.inputs):
                result.add(s.name)
        return result

    def ancestors(self, name: str) -> set[str]:
        """The given stage and everything it depends on, transitively."""
        result, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n not in result:
                result.add(n)
                todo.extend(self.upstream(n))
        return result
