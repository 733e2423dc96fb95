from __future__ import annotations

import pytest

from pipeline.artifacts import ArtifactSpec
from pipeline.config import MoeforgeConfig
from pipeline.dag import Dag, DagError
from pipeline.runner import plan
from pipeline.stage import Stage
from tests.pipeline.stages_for_tests import Numbers, Scale, Summarize, chain


def _stage(name, inputs=(), outputs=(), sections=()):
    return type(
        name.title(),
        (Stage,),
        {
            "name": name,
            "inputs": tuple(inputs),
            "outputs": tuple(ArtifactSpec(o) for o in outputs),
            "config_sections": tuple(sections),
        },
    )()


def test_order_follows_artifacts_not_declaration():
    dag = Dag([Summarize(), Numbers(), Scale()])
    assert [s.name for s in dag.order] == ["numbers", "scale", "summarize"]
    assert dag.upstream("summarize") == ["scale"]
    assert dag.downstream(["scale"]) == {"scale", "summarize"}
    assert dag.ancestors("scale") == {"numbers", "scale"}


def test_invalid_dags_are_refused():
    with pytest.raises(DagError, match="needs artifact 'y', which no stage produces"):
        Dag([_stage("a", inputs=["y"])])
    with pytest.raises(DagError, match="produced by both 'a' and 'b'"):
        Dag([_stage("a", outputs=["x"]), _stage("b", outputs=["x"])])
    with pytest.raises(DagError, match="cycle"):
        Dag([_stage("a", inputs=["y"], outputs=["x"]), _stage("b", inputs=["x"], outputs=["y"])])
    with pytest.raises(DagError, match="duplicate stage names: a"):
        Dag([_stage("a"), _stage("a")])
    with pytest.raises(DagError, match="unknown config sections"):
        Dag([_stage("a", sections=["nonsense"])])


def test_plan_selection():
    dag, cfg = Dag(chain()), MoeforgeConfig()
    selected, rerun, cached_only = plan(dag, cfg, until="scale")
    assert [s.name for s in selected] == ["numbers", "scale"] and not rerun and not cached_only
    selected, rerun, cached_only = plan(dag, cfg, from_stage="scale")
    assert rerun == {"scale", "summarize"} and cached_only == {"numbers"}
    _, rerun, _ = plan(dag, cfg, force=["numbers"])
    assert rerun == {"numbers"}
    selected, rerun, cached_only = plan(dag, cfg, only="scale")
    assert [s.name for s in selected] == ["numbers", "scale"] and cached_only == {"numbers"} and not rerun
    with pytest.raises(DagError, match="unknown stage 'nope'"):
        plan(dag, cfg, force=["nope"])
    with pytest.raises(DagError, match="does not combine"):
        plan(dag, cfg, only="scale", until="scale")


def test_upstream_among_looks_through_a_stage_that_is_off_and_passes_its_input_on():
    from pipeline.runner import default_stages

    dag = Dag(default_stages())
    assert dag.upstream("evaluate") == ["convert", "generate", "refine"]
    without_refine = ["generate", "distill", "convert", "train", "evaluate"]
    assert dag.upstream_among("evaluate", without_refine) == ["convert", "generate", "train"]
    assert dag.upstream_among("evaluate", [*without_refine, "refine"]) == ["convert", "generate", "refine"]
