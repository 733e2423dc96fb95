"""The stages' typed results: what is stored beside a checkpoint or a report, and the MLflow metrics it is logged as.

`ConversionReport` (conversion.json of `initial_student`), `RefineReport` (refine.json of `student`),
`EvaluationSummary` (summary.json of `eval_report`), `Registration`, `Exports` and `Endpoint` (register's and
serve's JSON files). They are written and read only through their types, and so are the MLflow metrics they are
logged as (`to_metrics` / `from_metrics`): their JSON keys and metric names live in this module alone. The artifacts
they sit in are declared in `artifact_specs`, the Parquet tables beside them in `parquet_schemas`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from pipeline.artifacts import write_json

# ---------------------------------------------------------------------------------------------------- typed results


class Result(BaseModel):
    """A stage's result as stored: validated when read, so a missing, unknown or mistyped field is an error that
    names it, never a silently wrong number."""

    model_config = ConfigDict(extra="forbid", frozen=True)


R = TypeVar("R", bound=Result)


class MetricGroup(Result):
    """Results whose field names are their MLflow metric names (and their keys in the JSON file)."""

    def to_metrics(self) -> dict[str, float]:
        return self.model_dump()

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> Self | None:
        """The group from a run's metrics (or a flat JSON record); None when it holds none of its names, an error
        when it holds some but not all."""
        present = {name: metrics[name] for name in cls.model_fields if name in metrics}
        return cls.model_validate(present) if present else None


# ---------------------------------------------------------------------------------------------------- generate


# ---------------------------------------------------------------------------------------------------- distill


# ---------------------------------------------------------------------------------------------------- convert

CONVERSION_FILE = "conversion.json"


class Fidelity(MetricGroup):
    """How close the converted student is to the teacher on held-out teacher text, before any task training."""

    kl_to_teacher: float  # mean next-token KL(teacher || student), nats per token
    student_ppl: float
    teacher_ppl: float
    held_out_tokens: int  # the tokens both were scored on
    calibration_tokens: int  # the teacher tokens the conversion was calibrated on


class Recovery(MetricGroup):
    """The KL-distillation back towards the teacher after conversion (`convert.recovery_steps`), and where the
    student stood before it (the conversion's own divergence and perplexity)."""

    recovery_tokens: int
    recovery_seconds: float
    recovery_tokens_per_s: float
    kl_to_teacher_converted: float
    student_ppl_converted: float


class Costs(MetricGroup):
    """What the student costs beside the teacher per token: parameters touched and KV-cache floats."""

    student_params_total: int
    student_params_active: int
    student_params_active_nonembedding: int
    teacher_params_total: int
    teacher_params_nonembedding: int
    active_param_ratio: float  # active non-embedding parameters, student / teacher
    student_cache_floats_per_token: int
    teacher_cache_floats_per_token: int
    cache_ratio: float


class Economics(Costs):
    """The costs, with the embedding parameters of each (the input embedding and the output head)."""

    student_params_embedding: int
    teacher_params_embedding: int

    def costs(self) -> Costs:
        """The costs `evaluate` reports beside pass@1 (no embedding counts)."""
        return Costs.model_validate(self.model_dump(include=set(Costs.model_fields)))


class ScratchSize(MetricGroup):
    """The size of a randomly initialised student (`model.init: scratch`): nothing to compare with a teacher."""

    params_total: int
    params_active: int


class ConversionReport(Result):
    """conversion.json of `initial_student`: how the student was made and, when converted from the teacher, which
    layers and rope pairs it kept, how far it is from the teacher and what it costs beside it.

    The file is one flat record: these fields, then every metric of `fidelity`, `recovery` and `economics` under
    its metric name (what `convert` logs to MLflow). A scratch student's record is its `init` alone.
    """

    init: Literal["teacher", "scratch"]
    teacher: str | None = None  # the converted teacher (model name or directory)
    layout: Literal["exact", "standard"] | None = None  # convert.layout (None: a scratch student)
    layers: list[int] | None = None  # the teacher layer of each student layer
    rope_pairs: list[list[list[int]]] | None = None  # per student layer, per KV head: the kept channel pairs
    # standard layout, per student layer: the kept frequencies' key energy its shared rope key holds, the latent
    # norm's anchor (its RMS over the rest of the latent's; 0: none) and the latent's scale the up-projection holds
    rope_key_energy: list[float] | None = None
    latent_anchor: list[float] | None = None
    latent_scale: list[float] | None = None
    block_importance: list[float] | None = None  # every teacher layer's block importance
    calibration_samples: int | None = None
    held_out_samples: int | None = None
    fidelity: Fidelity | None = None
    recovery: Recovery | None = None  # only with convert.recovery_steps > 0
    economics: Economics | None = None

    GROUPS: ClassVar[dict[str, type[MetricGroup]]] = {
        "fidelity": Fidelity,
        "recovery": Recovery,
        "economics": Economics,
    }
    KEY_METRICS: ClassVar[tuple[str, ...]] = ("kl_to_teacher", "student_ppl", "active_param_ratio", "cache_ratio")

    def to_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.GROUPS:
            group = getattr(self, name)
            if group is not None:
                out.update(group.to_metrics())
        return out

    def to_json(self) -> dict[str, Any]:
        return {**self.model_dump(exclude_none=True, exclude=set(self.GROUPS)), **self.to_metrics()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConversionReport:
        measured = {n for group in cls.GROUPS.values() for n in group.model_fields}
        header = {k: v for k, v in data.items() if k not in measured}
        return cls.model_validate({**header, **{name: g.from_metrics(data) for name, g in cls.GROUPS.items()}})


def write_conversion(path, report: ConversionReport) -> None:
    """conversion.json into the `initial_student` folder `path`."""
    write_json(Path(path) / CONVERSION_FILE, report.to_json())


def read_conversion(path) -> ConversionReport:
    """The conversion.json of the `initial_student` folder `path`."""
    return ConversionReport.from_json(json.loads((Path(path) / CONVERSION_FILE).read_text()))


# ---------------------------------------------------------------------------------------------------- train


# ---------------------------------------------------------------------------------------------------- refine

REFINE_FILE = "refine.json"


class RefineIteration(MetricGroup):
    """One refine iteration's figures, as logged on the run at step = the iteration (`refine.<name>` there)."""

    reward: float  # mean verifier reward of the iteration's samples (pass@1 at the rollout temperature)
    reward_std_within_groups: float  # mean std of rewards inside a group: 0 means GRPO has nothing to learn from
    reverse_kl: float  # KL(student || teacher) per completion token, on the teacher's k + 1 buckets
    teacher_token_logprob: float  # the teacher's mean log-prob of the student's sampled tokens
    entropy: float  # the student's per-token entropy at temperature 1
    completion_tokens: float  # mean completion length
    truncated_rate: float  # share of completions that hit max_new_tokens
    clip_fraction: float
    kl_to_start: float  # KL(student || starting student) per token; nan (not logged) without a reference
    routing_agreement: float  # (token, layer) expert choices the update left unchanged
    update_loss: float
    rollout_tokens_per_s: float
    scoring_tokens_per_s: float
    update_tokens_per_s: float
    rollout_tokens: float
    teacher_scored_tokens: float
    seconds: float


class RefineReport(Result):
    """`refine.json`: what refining did and what it cost."""

    objective: str
    iterations: int
    samples_per_iteration: int
    rollout_tokens: int
    teacher_scored_tokens: int  # tokens the teacher ran over (its context included)
    learner_tokens: int  # completion tokens trained on
    minutes: float  # wall time of the stage's iterations (resumed ones: as first measured)
    router: str
    reward_by_iteration: list[float]
    reverse_kl_by_iteration: list[float]
    accuracy_by_task_last: dict[str, float]


# ---------------------------------------------------------------------------------------------------- evaluate

SUMMARY_FILE = "summary.json"
# the graded models (REPORT_SCHEMA's `model`) in the order they are shown, and how they are named there
MODEL_LABELS = {"teacher": "teacher", "teacher_best": "teacher, worked examples", "student": "student"}
FLOOR_ANSWERS_TAG = "moeforge.floor.answer_by_task"  # JSON {task: answer}; strings are no metrics
_DECODE = re.compile(r"(student|teacher)_decode_tokens_per_s_batch(\d+)")


class PassAt1(Result):
    pass_at_1: float  # over every held-out prompt
    pass_at_1_by_task: dict[str, float]

    def pass_at_1_on(self, task: str | None) -> float | None:
        """pass@1 on `task` (None: overall); None when no prompt of that task was graded."""
        return self.pass_at_1 if task is None else self.pass_at_1_by_task.get(task)


class ModelResult(PassAt1):
    """One model's greedy answers to the held-out prompts, graded."""

    mean_completion_tokens: float
    format_failure_rate: float  # answers not stated in the taught format
    truncated_rate: float  # cut off at max_new_tokens
    prompts: int


class Floor(PassAt1):
    """The constant-answer floor: always answering each task's most frequent reference answer."""

    answer_by_task: dict[str, str]


class DecodeSpeed(Result):
    """Greedy decoding tokens/s at one batch size, both models in the same process one after the other."""

    student: float
    teacher: float | None = None  # None: a remote teacher (its speed is its server's, not a model's)


class SummaryEconomics(Result):
    """What the student costs beside the teacher (from `convert`), and how fast each decodes on this machine.

    In summary.json (and as `economics.<key>` metrics) one flat record: the costs' and `kl_to_teacher`'s names,
    and `<model>_decode_tokens_per_s_batch<b>` per batch size.
    """

    costs: Costs | None = None  # a converted student's; a scratch one has no teacher to compare with
    kl_to_teacher: float | None = None  # before task training (after recovery, when there was one)
    decode_tokens_per_s: dict[int, DecodeSpeed] = Field(default_factory=dict)  # by batch size

    @classmethod
    def of(cls, conversion: ConversionReport, speeds: dict[int, DecodeSpeed]) -> SummaryEconomics:
        return cls(
            costs=conversion.economics.costs() if conversion.economics else None,
            kl_to_teacher=conversion.fidelity.kl_to_teacher if conversion.fidelity else None,
            decode_tokens_per_s=speeds,
        )

    def to_json(self) -> dict[str, float]:
        out = self.costs.to_metrics() if self.costs else {}
        if self.kl_to_teacher is not None:
            out["kl_to_teacher"] = self.kl_to_teacher
        for batch, speed in self.decode_tokens_per_s.items():
            out[f"student_decode_tokens_per_s_batch{batch}"] = speed.student
            if speed.teacher is not None:
                out[f"teacher_decode_tokens_per_s_batch{batch}"] = speed.teacher
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, float]) -> SummaryEconomics:
        speeds: dict[int, dict[str, float]] = {}
        rest = {}
        for key, value in data.items():
            if m := _DECODE.fullmatch(key):
                speeds.setdefault(int(m[2]), {})[m[1]] = value
            else:
                rest[key] = value
        if unknown := sorted(set(rest) - set(Costs.model_fields) - {"kl_to_teacher"}):
            raise ValueError(f"unknown economics: {', '.join(unknown)}")
        return cls(
            costs=Costs.from_metrics(rest),
            kl_to_teacher=rest.get("kl_to_teacher"),
            decode_tokens_per_s={b: DecodeSpeed.model_validate(s) for b, s in sorted(speeds.items())},
        )


class EvaluationSummary(Result):
    """summary.json of `eval_report`: each model's pass@1 (overall and per task) and answer statistics on the
    held-out split, the constant-answer floor, and the student's economics.

    Logged as metrics of the evaluate run, flat: `<model>.pass_at_1`, `<model>.pass_at_1.<task>`,
    `<model>.<statistic>` for the models and the floor, `economics.<key>`; the floor's answers as the tag
    `FLOOR_ANSWERS_TAG`.
    """

    teacher: ModelResult
    teacher_best: ModelResult | None = None  # the teacher with worked examples; None in a summary from before it
    student: ModelResult
    floor: Floor | None = None  # None in a summary from before it
    economics: SummaryEconomics = Field(default_factory=SummaryEconomics)

    KEY_METRICS: ClassVar[tuple[str, ...]] = ("teacher.pass_at_1", "student.pass_at_1")

    def models(self) -> dict[str, ModelResult]:
        """The graded models present, in `MODEL_LABELS` order, by their name in the report."""
        return {name: result for name in MODEL_LABELS if (result := getattr(self, name)) is not None}

    def tasks(self) -> list[str]:
        return sorted(self.teacher.pass_at_1_by_task)

    def to_json(self) -> dict[str, Any]:
        return {**self.model_dump(exclude_none=True, exclude={"economics"}), "economics": self.economics.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvaluationSummary:
        return cls.model_validate({**data, "economics": SummaryEconomics.from_json(data.get("economics", {}))})

    def to_metrics(self) -> dict[str, float]:
        out = _flatten("floor", self.floor.model_dump(exclude={"answer_by_task"})) if self.floor else {}
        for name, result in self.models().items():
            out.update(_flatten(name, result.model_dump()))
        return out | {f"economics.{k}": v for k, v in self.economics.to_json().items()}

    def to_tags(self) -> dict[str, str]:
        return {FLOOR_ANSWERS_TAG: json.dumps(self.floor.answer_by_task, sort_keys=True)} if self.floor else {}

    @classmethod
    def from_metrics(
        cls, metrics: Mapping[str, float], tags: Mapping[str, str] | None = None
    ) -> EvaluationSummary | None:
        """The summary from an evaluate run's metrics and tags; None when the run logged none (yet). The floor's
        answers are empty for a run that did not tag them."""
        data: dict[str, Any] = {
            name: _unflatten(name, ModelResult, metrics) for name in MODEL_LABELS if f"{name}.pass_at_1" in metrics
        }
        if not data:
            return None
        if "floor.pass_at_1" in metrics:
            answers = json.loads((tags or {}).get(FLOOR_ANSWERS_TAG, "{}"))
            data["floor"] = {**_unflatten("floor", Floor, metrics), "answer_by_task": answers}
        economics = {k.removeprefix("economics."): v for k, v in metrics.items() if k.startswith("economics.")}
        return cls.model_validate({**data, "economics": SummaryEconomics.from_json(economics)})


def _flatten(prefix: str, record: dict[str, Any]) -> dict[str, float]:
    """`<prefix>.<field>` per number, `<prefix>.<field without _by_task>.<task>` per task of a per-task field."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{prefix}.{key.removesuffix('_by_task')}.{task}": v for task, v in value.items()})
        else:
            out[f"{prefix}.{key}"] = value
    return out


def _unflatten(prefix: str, cls: type[PassAt1], metrics: Mapping[str, float]) -> dict[str, Any]:
    """What `_flatten` made of a `cls`, back from `metrics` (the floor's answers are no metrics)."""
    data: dict[str, Any] = {}
    for key in cls.model_fields:
        if key == "answer_by_task":
            continue
        if key.endswith("_by_task"):
            stem = f"{prefix}.{key.removesuffix('_by_task')}."
            data[key] = {k.removeprefix(stem): v for k, v in sorted(metrics.items()) if k.startswith(stem)}
        elif f"{prefix}.{key}" in metrics:
            data[key] = metrics[f"{prefix}.{key}"]
    return data


def write_summary(path, summary: EvaluationSummary) -> None:
    """summary.json into the `eval_report` folder `path`."""
    write_json(Path(path) / SUMMARY_FILE, summary.to_json())


def read_summary(path) -> EvaluationSummary:
    """The summary.json of the `eval_report` folder `path`."""
    return EvaluationSummary.from_json(json.loads((Path(path) / SUMMARY_FILE).read_text()))


# ---------------------------------------------------------------------------------------------------- register, serve

REGISTRATION_FILE, EXPORTS_FILE, ENDPOINT_FILE = "registration.json", "exports.json", "endpoint.json"


class Exports(Result):
    """`exports.json`: each exported format's path inside the `exports` output, or why nothing was exported."""

    hf: str | None = None  # a transformers model directory (vLLM and SGLang read it too)
    gguf: str | None = None  # llama.cpp's file
    skipped: str | None = None  # the reason no engine can run the student, naming the setting to change


class Registration(Result):
    """`registration.json`: the version register made and the gate's decision."""

    name: str
    version: int
    alias: Literal["champion", "challenger"]
    reason: str
    model_uri: str  # models:/<name>@<alias>
    student_pass_at_1: float
    teacher_pass_at_1: float
    champion_pass_at_1: float | None = None  # the champion's, if there was one to compare with
    exports: Exports


class Endpoint(Result):
    """`endpoint.json`: where the serve stage's app answers and exactly which version it serves."""

    url: str
    openai_base_url: str
    model: str
    model_uri: str  # as configured, e.g. models:/<name>@champion
    pinned_uri: str  # the version it resolved to
    version: str | None = None  # None: a model served by path, not from the registry
    alias: str | None = None


def write_result(path, result: RefineReport | Exports | Registration | Endpoint) -> None:
    """A refine, register or serve result into its output folder `path`, under its file name."""
    write_json(Path(path) / _RESULT_FILES[type(result)], result.model_dump(exclude_none=True))


def read_result(path, kind: type[R]) -> R:
    """The result of type `kind` from the output folder `path`: validated, so a missing or mistyped field is an
    error that names it."""
    return kind.model_validate_json((Path(path) / _RESULT_FILES[kind]).read_text())


_RESULT_FILES: dict[type, str] = {
    RefineReport: REFINE_FILE,
    Exports: EXPORTS_FILE,
    Registration: REGISTRATION_FILE,
    Endpoint: ENDPOINT_FILE,
}
