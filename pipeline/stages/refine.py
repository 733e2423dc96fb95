"""Stage `refine`: the trained student learns from its own attempts (on-policy distillation, GRPO, or both).

Each of `refine.iterations` iterations:
1. *rollouts*: the current student samples `group_size` completions of each of `prompts_per_iteration` training
   prompts (never held-out ones: the same split `generate` drew from) on a pool of student actors, at
   `temperature`; the actors take the newest weights from the object store with the request;
2. *scoring*: the verifiers grade every completion (reward 1 or 0, as `evaluate` grades); the teacher's actor pool
   scores the student's tokens after the teacher's own best prompt (the task's worked examples, which the student
   never sees; `teacher_context: same` gives it the student's prompt instead): top-k log-probs as `distill`
   stores them, plus the log-prob of each sampled token;
3. *update*: a learner step on the objective of `pipeline/train/policy_losses.py`, by one Ray Train worker group
   kept for the whole stage (`actors/learner.py`, `pipeline/train/policy_learner.py`; started while the first
   rollouts run, its models stay in memory between iterations);
4. the new weights go back to the rollout actors through the object store.

Each finished iteration is kept in the stage's resume space (weights, AdamW state, its figures), so a stage
rerun after a crash continues at the last finished iteration; its figures are logged to the run at step =
iteration once that iteration is kept, and a resumed run logs the earlier ones again from what was kept, so every
iteration appears once in each run. With `iterations: 0` the stage is off and `student` is the trained student.
The refined student is saved with `refine.json` (what it did and cost) and logged on this run as the MLflow model
`register` registers.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.sources import Prompt
from pipeline.stage import Stage, StageContext
from pipeline.stages.artifact_specs import STUDENT
from pipeline.stages.results import RefineIteration, RefineReport, write_result
from pipeline.train.iteration_store import IterationStore, drop_run
from pipeline.train.rollouts import Rollout, grade, iteration_prompts, policy_samples

if TYPE_CHECKING:
    from ray import ObjectRef
    from transformers import PreTrainedTokenizerBase

    from actors.learner import LearnerGroup
    from actors.object_store import CarriedState
    from actors.pool import ActorPool

log = logging.getLogger(__name__)


@dataclass
class IterationInputs:
    """What every iteration reads and none changes."""

    tokenizer: PreTrainedTokenizerBase
    prompts: list[Prompt]  # the training split
    reference: ObjectRef | None  # the starting student's state in the object store (None: no KL term)


@dataclass
class RefineWorkers:
    """The stage's three Ray roles, started once for all its iterations."""

    students: ActorPool  # rollout actors (`actors/student.py`)
    teachers: ActorPool  # the teacher scoring the completions (`actors/teacher.py`)
    learner: LearnerGroup  # the Ray Train worker group that updates the student (`actors/learner.py`)


class Refine(Stage):
    name = "refine"
    inputs = ("trained_student",)
    outputs = (STUDENT,)
    passthrough = (("student", "trained_student"),)
    config_sections = ("teacher", "data", "distill", "train", "refine")
    key_metrics = ("reward", "reverse_kl", "iterations")
    description = "the student learns from its own samples: on-policy distillation and/or GRPO, on Ray"

    def enabled(self, config) -> bool:
        return config.refine.iterations > 0

    def run(self, ctx: StageContext) -> None:
        from transformers import AutoTokenizer

        from actors.learner import LearnerGroup
        from actors.object_store import CarriedState, put_tensors
        from actors.pool import ActorPool, torch_threads
        from actors.student import StudentWorker
        from actors.teacher import teacher_pool
        from pipeline.data.sources import load_prompts
        from pipeline.model import Transformer
        from pipeline.student.registry import log_student

        cfg, r = ctx.config, ctx.config.refine
        check_batch(r)
        student_dir = ctx.input_path("trained_student")
        tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
        model = Transformer.from_pretrained(student_dir)
        prompts = load_prompts(cfg.data)["train"]
        if not prompts:
            raise ValueError("refine has no training prompts: set data.num_train_prompts >= 1")
        kept = IterationStore(ctx.resume_dir / "iterations")
        done = kept.done()
        for i in done:  # a resumed stage: the iterations already finished, once each on this run
            self.log_iteration(ctx, i, kept.metrics(i))
        if done:
            carried = CarriedState(kept.state(done[-1]))
            log.info("refine: resuming after iteration %d of %d", done[-1], r.iterations)
        else:
            carried = CarriedState({"model": model.state_dict(), "optimizer": None})
        needs_reference = r.objective != "opd" and r.kl_coef > 0
        inputs = IterationInputs(tokenizer, prompts, put_tensors(model.state_dict()) if needs_reference else None)
        model_cfg = model.cfg
        del model  # the state alone is carried: no second copy of the weights in this process
        storage = r.storage_path or cfg.train.storage_path or str((ctx.workdir / "checkpoints").resolve())
        ctx.set_tags({"moeforge.refine.router": r.router, "moeforge.refine.objective": r.objective})
        first = len(done)
        bar = ctx.progress(total=r.iterations, desc="refine")
        bar.update(first)
        if first < r.iterations:
            run_name = f"refine-{ctx.call.key[:16]}"
            drop_run(storage, run_name)  # a group of a stage attempt that died: its Ray Train run starts afresh
            threads = torch_threads(r.num_cpus_per_actor, r.num_gpus_per_actor)
            student_args = (ctx.call.inputs["trained_student"], ctx.call.tracking_uri, str(ctx.workdir), threads)
            teacher = cfg.teacher.model_copy(update={"num_cpus_per_actor": r.num_cpus_per_actor})
            with (
                ActorPool(
                    StudentWorker,
                    student_args,
                    size=r.num_actors,
                    name=f"refine-{ctx.run_id[:8]}.student",
                    num_cpus=r.num_cpus_per_actor,
                    num_gpus=r.num_gpus_per_actor,
                    scheduling_strategy=ctx.scheduling_strategy,
                ) as students,
                teacher_pool(
                    teacher,
                    f"refine-{ctx.run_id[:8]}.teacher",
                    scheduling_strategy=ctx.scheduling_strategy,
                    for_scoring=True,
                    vocabulary=cfg.teacher.vocabulary(cfg.distill.tokenizer),
                ) as teachers,
                LearnerGroup(
                    model_cfg, r, r.top_k, run_name, storage, channel_name=f"refine-{ctx.run_id[:8]}.learner"
                ) as learner,
            ):
                workers = RefineWorkers(students, teachers, learner)
                for i in range(first, r.iterations):
                    metrics = self.iteration(ctx, i, carried, inputs, workers)
                    kept.save(i, carried.state, metrics)
                    self.log_iteration(ctx, i, metrics)
                    bar.update(1)
            drop_run(storage, run_name)  # the learner group's run folder: the iterations are kept in the resume space
        bar.close()
        model = Transformer.from_pretrained(student_dir)
        model.load_state_dict(carried.state["model"])
        out = ctx.output_dir("student")
        model.save_pretrained(out, tokenizer)
        report = summarize(r, [kept.metrics(i) for i in kept.done()])
        write_result(out, report)
        ctx.log_metrics({"iterations": report.iterations, "minutes": report.minutes})
        info = log_student(out, ctx.run_id, ctx.call.tracking_uri)
        ctx.set_tags({"moeforge.model_uri": info.model_uri})

    def iteration(
        self, ctx: StageContext, i: int, carried: CarriedState, inputs: IterationInputs, workers: RefineWorkers
    ) -> dict[str, float]:
        """One iteration: rollouts, grading, teacher scoring, the update. Returns its figures; `carried` then holds
        the updated state."""
        import torch

        from pipeline.train.policy_losses import group_advantages

        r = ctx.config.refine
        t0 = time.perf_counter()
        chosen = [inputs.prompts[j] for j in iteration_prompts(len(inputs.prompts), r.prompts_per_iteration, i, r.seed)]
        weights = carried.publish()  # one copy, in the object store, for the rollout actors and the learner
        rollouts, rollout_s = self.rollouts(ctx, i, weights, chosen, inputs.tokenizer, workers.students)
        grade(rollouts, inputs.tokenizer, ctx.config.teacher.answer_extractors)
        scored_tokens, scoring_s = self.scores(ctx, rollouts, inputs.tokenizer, workers.teachers)
        rewards_PG = torch.tensor([[x.reward for x in rollouts if x.group == g] for g in range(len(chosen))])
        advantages_PG = group_advantages(rewards_PG) if r.objective != "opd" else torch.zeros_like(rewards_PG)
        samples = policy_samples(rollouts, advantages_PG)
        del weights
        t_learn = time.perf_counter()
        learned = workers.learner.update(i, carried, inputs.reference, samples)
        learn_s = time.perf_counter() - t_learn
        rollout_tokens = sum(len(x.tokens) for x in rollouts)
        own = [float(v) for x in rollouts if x.targets is not None and x.targets.token_logprobs is not None
               for v in x.targets.token_logprobs]  # fmt: skip
        by_task: dict[str, list[float]] = defaultdict(list)
        for x in rollouts:
            by_task[x.prompt.task].append(x.reward)
        figures = RefineIteration(
            reward=float(rewards_PG.mean()),
            reward_std_within_groups=float(rewards_PG.std(dim=1).nan_to_num(0.0).mean()),
            reverse_kl=learned.reverse_kl,
            teacher_token_logprob=float(np.mean(own)) if own else math.nan,
            entropy=learned.entropy,
            completion_tokens=rollout_tokens / len(rollouts),
            truncated_rate=sum(x.finish_reason == "length" for x in rollouts) / len(rollouts),
            clip_fraction=learned.clip_fraction,
            kl_to_start=learned.kl_to_start,
            routing_agreement=learned.routing_agreement,
            update_loss=learned.update_loss,
            rollout_tokens_per_s=rollout_tokens / rollout_s,
            scoring_tokens_per_s=scored_tokens / scoring_s,
            update_tokens_per_s=learned.learner_tokens / learn_s,
            rollout_tokens=float(rollout_tokens),
            teacher_scored_tokens=float(scored_tokens),
            seconds=time.perf_counter() - t0,
        )
        return {
            **figures.to_metrics(),
            "learner_tokens": learned.learner_tokens,
            **{f"reward.{task}": float(np.mean(v)) for task, v in sorted(by_task.items())},
        }

    def rollouts(
        self, ctx: StageContext, i: int, weights_ref: ObjectRef, chosen: list[Prompt], tokenizer, students: ActorPool
    ) -> tuple[list[Rollout], float]:
        """Every prompt's `group_size` completions from the rollout actors, with this iteration's weights."""
        from actors.student import RolloutRequest, Weights
        from pipeline.data.prompts import chat_token_ids, student_messages

        r = ctx.config.refine
        weights = Weights(i, weights_ref)  # version i: the weights after i updates
        ids = [chat_token_ids(tokenizer, student_messages(p.question)) for p in chosen]
        per_actor = -(-len(chosen) // r.num_actors)
        requests = [
            (
                start,
                RolloutRequest(
                    ids[start : start + per_actor],
                    r.group_size,
                    r.max_new_tokens,
                    r.temperature,
                    seed=r.seed + 1_000_003 * i + start * r.group_size,
                    weights=weights,
                ),
            )
            for start in range(0, len(chosen), per_actor)
        ]
        t0 = time.perf_counter()
        results = dict(students.map_unordered("rollout", requests))
        seconds = time.perf_counter() - t0
        out = []
        for start, result in sorted(results.items()):
            if result.weights_version != i:
                raise RuntimeError(f"a rollout actor sampled with weights {result.weights_version}, not {i}")
            for offset, completions in enumerate(result.completions):
                g = start + offset
                out += [Rollout(chosen[g], g, ids[g], toks, reason) for toks, reason in completions]
        return out, seconds

    def scores(self, ctx: StageContext, rollouts: list[Rollout], tokenizer, teachers: ActorPool) -> tuple[int, float]:
        """The teacher's scores of every completion's tokens, after its best prompt (or the student's)."""
        from actors.teacher import TokenScoreRequest
        from pipeline.data.prompts import teacher_context_ids

        r = ctx.config.refine
        contexts: dict[str, list[int]] = {}
        sequences, starts = [], []
        for x in rollouts:
            key = x.prompt.prompt_id
            if key not in contexts:
                contexts[key] = teacher_context_ids(tokenizer, x.prompt.task, x.prompt.question, r.teacher_context)
            sequences.append(contexts[key] + x.tokens)
            starts.append(len(contexts[key]))
        size = ctx.config.teacher.batch_size
        requests = [
            (s, TokenScoreRequest(sequences[s : s + size], starts[s : s + size], r.top_k, size))
            for s in range(0, len(sequences), size)
        ]
        t0 = time.perf_counter()
        tokens = 0
        for s, result in teachers.map_unordered("score_tokens", requests):
            tokens += result.tokens
            for j, targets in enumerate(result.targets):
                rollouts[s + j].targets = targets
        return tokens, time.perf_counter() - t0

    def log_iteration(self, ctx: StageContext, i: int, metrics: dict[str, Any]) -> None:
        ctx.log_metrics({k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}, step=i)
        ctx.record("moeforge_refine_iteration", i)
        ctx.record("moeforge_refine_reward", metrics["reward"])
        ctx.record("moeforge_refine_reverse_kl", metrics["reverse_kl"])
        ctx.record("moeforge_refine_rollout_tokens", metrics["rollout_tokens"])


def check_batch(r) -> None:
    """Every learner rank needs a sample for each of its updates."""
    samples = r.prompts_per_iteration * r.group_size
    if samples < r.num_workers * r.updates_per_iteration:
        raise ValueError(
            f"refine: {samples} samples per iteration (prompts_per_iteration x group_size) cannot feed "
            f"{r.num_workers} learner workers x {r.updates_per_iteration} updates_per_iteration"
        )


def summarize(r, figures: list[dict[str, Any]]) -> RefineReport:
    """refine.json: what the finished iterations did and cost."""
    last = figures[-1] if figures else {}
    return RefineReport(
        objective=r.objective,
        iterations=len(figures),
        samples_per_iteration=r.prompts_per_iteration * r.group_size,
        rollout_tokens=int(sum(f["rollout_tokens"] for f in figures)),
        teacher_scored_tokens=int(sum(f["teacher_scored_tokens"] for f in figures)),
        learner_tokens=int(sum(f["learner_tokens"] for f in figures)),
        minutes=sum(f["seconds"] for f in figures) / 60,
        router=r.router,
        reward_by_iteration=[f["reward"] for f in figures],
        reverse_kl_by_iteration=[f["reverse_kl"] for f in figures],
        accuracy_by_task_last={k.removeprefix("reward."): v for k, v in last.items() if k.startswith("reward.")},
    )
