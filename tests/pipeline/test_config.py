from __future__ import annotations

import pytest

from pipeline.config import ConfigError, MoeforgeConfig, available_presets, load_config


def test_presets_load_and_tiny_is_the_embedded_default():
    assert {"tiny", "gpu-small", "cluster"} <= set(available_presets())
    for name in ("tiny", "gpu-small", "cluster"):
        assert load_config(name).name == name
    assert load_config("tiny") == MoeforgeConfig()


def test_overrides_apply_with_yaml_types():
    cfg = load_config(
        "tiny",
        [
            "train.max_steps=50",
            "train.use_gpu=true",
            "teacher.temperature=0.7",
            "ray.address=ray://head:10001",
            "data.tasks=[{name: chain_sum, weight: 2}]",
        ],
    )
    assert cfg.train.max_steps == 50 and cfg.train.use_gpu is True and cfg.teacher.temperature == 0.7
    assert cfg.ray.address == "ray://head:10001"
    assert [(t.name, t.weight) for t in cfg.data.tasks] == [("chain_sum", 2.0)]


def test_config_hash_tracks_content():
    assert load_config("tiny").hash() == MoeforgeConfig().hash()
    assert load_config("tiny", ["distill.top_k=5"]).hash() != MoeforgeConfig().hash()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model.n_activated_experts=21"],
            "model.n_activated_experts: n_activated_experts (21) must be <= n_routed_experts (20)",
        ),
        (["model.n_group=3"], "model.n_group: n_group (3) must divide n_routed_experts (20)"),
        (["model.n_group=4", "model.topk_group=1", "model.n_activated_experts=6"], "model.topk_group"),
        (["model.qk_rope_head_dim=15"], "model.qk_rope_head_dim: qk_rope_head_dim (15) must be even"),
        (["model.n_dense_layers=31"], "model.n_dense_layers: n_dense_layers (31) must be <= n_layers (30)"),
        (["train.max_steps=abc"], "train.max_steps: Input should be a valid integer"),
        (["train.max_steps=0"], "train.max_steps: Input should be greater than or equal to 1"),
        (["train.warmup_steps=500"], "train.warmup_steps: warmup_steps (500) must be <= max_steps (24)"),
        (["train.learning_rate=1"], "train.learning_rate: unknown key"),
        (["bogus.key=1"], "bogus: unknown key"),
        (["teacher.backend=openai"], "teacher.base_url: base_url is required when backend is 'openai'"),
        (
            ["teacher.backend=openai", "teacher.base_url=http://127.0.0.1:8000/v1"],
            "convert needs the teacher's weights (model.init=teacher), but teacher.backend=openai serves them "
            "remotely: set teacher.weights=<local model dir or .gguf of the same model> or model.init=scratch",
        ),
        (["data.source=file"], "data.path: path is required when source is 'file'"),
        (["data.tasks=[{weight: 1}]"], "data.tasks.0.name: Field required"),
        (["serve.autoscaling={min_replicas: 3, max_replicas: 2}"], "serve.autoscaling.max_replicas"),
        (["train.max_steps.x=1"], "train.max_steps is a value"),
        (["train.max_steps"], "--set expects KEY.PATH=VALUE"),
    ],
)
def test_bad_config_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as exc:
        load_config("tiny", overrides)
    assert expected in str(exc.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        load_config("tiny", ["train.max_steps=abc", "model.oops=1"])
    assert "train.max_steps" in str(exc.value) and "model.oops: unknown key" in str(exc.value)


def test_unknown_preset_lists_the_available_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config preset 'nope'; available presets: .*tiny"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [1, 2]\n")
    with pytest.raises(ConfigError, match="teacher: Input should be a valid dictionary"):
        load_config(str(bad))
    bad.write_text("teacher: {backend: hf\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_slice_holds_only_declared_sections():
    cfg = MoeforgeConfig()
    s = cfg.slice(("distill", "teacher"))
    assert set(s) == {"distill", "teacher"} and s["distill"]["top_k"] == 20


def test_a_remote_teacher_with_local_weights_or_a_scratch_student_is_valid():
    """What needs the teacher's weights asks `local_weights()`: the model for a local backend, `weights` for a
    server; the vocabulary falls back to distill.tokenizer when there are none."""
    remote = ["teacher.backend=openai", "teacher.base_url=http://127.0.0.1:8000/v1", "teacher.model=served"]
    cfg = load_config("tiny", [*remote, "teacher.weights=/models/teacher.gguf"])
    assert cfg.teacher.local_weights() == cfg.teacher.vocabulary("x") == "/models/teacher.gguf"
    cfg = load_config("tiny", [*remote, "model.init=scratch", "distill.tokenizer=/tok"])
    assert cfg.teacher.local_weights() is None and cfg.teacher.vocabulary(cfg.distill.tokenizer) == "/tok"
    local = load_config("tiny")
    assert local.teacher.local_weights() == local.teacher.model
    with pytest.raises(ConfigError, match=r"teacher\.weights: weights names a served teacher's local copy"):
        load_config("tiny", ["teacher.weights=/models/teacher.gguf"])


def test_the_teachers_context_is_part_of_distills_identity_and_best_by_default():
    """Soft targets scored after the worked examples are other targets: a run that changes the context must not
    take the cached ones (and `train`, reading them, reruns too, since its input hash changes)."""
    from pipeline.artifacts import ArtifactRef
    from pipeline.runner import stage_key
    from pipeline.stages.distill import Distill

    samples = {"samples": ArtifactRef(name="samples", uri="file:///x", hash="ab" * 32)}

    def key(*overrides: str) -> str:
        cfg = load_config("tiny", list(overrides))
        return stage_key(Distill(), cfg.slice(Distill.config_sections), samples, "0+src.test")

    assert load_config("tiny").distill.teacher_context == "best"
    assert key() == key("distill.teacher_context=best") != key("distill.teacher_context=same")
    with pytest.raises(ConfigError, match="teacher_context"):
        load_config("tiny", ["distill.teacher_context=worked"])
