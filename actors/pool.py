"""A small actor group: N actors of one class, placement, bounded fan-out, and recovery from dead actors.

Stages hand it keyed work items; it keeps at most `max_in_flight_per_actor` calls queued on each actor
(backpressure: a slow pool never holds the whole dataset in flight), yields results as they finish, and when an
actor dies (killed, OOM, node lost), while starting or mid-work, it starts a replacement in the same slot and
re-queues every item that actor held; a constructor that raises fails the pool at once with its error. Items are
identified by key, so a stage that writes one output per key never loses or duplicates work.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

log = logging.getLogger(__name__)


class PoolError(RuntimeError):
    """An item failed on every attempt, or the actors cannot start; the message names the item and the cause."""


@dataclass
class _Slot:
    index: int
    actor: Any
    generation: int = 0  # replacements so far; part of the actor's name
    in_flight: int = 0


@dataclass
class _Item:
    key: Any
    payload: Any
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


class ActorPool:
    """N actors of `cls` built with the same arguments, named `<name>-<slot>[.r<n>]` in the job's namespace.

    Args:
        cls: the plain class to run as an actor (wrapped with `ray.remote` here).
        args, kwargs: its constructor arguments.
        size: number of actors.
        name: prefix of actor names (tests and dashboards find actors by it).
        num_cpus, num_gpus: resources of each actor.
        scheduling_strategy: Ray scheduling strategy; "SPREAD" places actors over as many nodes as possible.
        max_in_flight_per_actor: calls queued on one actor at a time.
        max_replacements: actor deaths tolerated over the pool's life before giving up.
        start_timeout_s: how long the actors may take to be placed and built, then the pool fails naming what they
            asked for and what is free (Ray queues an actor it cannot place until resources appear: forever).
    """

    def __init__(
        self,
        cls: type,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        size: int = 1,
        name: str = "moeforge.actor",
        num_cpus: float = 1,
        num_gpus: float = 0,
        scheduling_strategy: Any = "SPREAD",
        max_in_flight_per_actor: int = 2,
        max_replacements: int = 8,
        start_timeout_s: float = 600.0,
    ):
        self._remote: Any = ray.remote(cls)  # an ActorClass of `cls`
        self._args, self._kwargs = args, kwargs or {}
        self.name = name
        self._options = dict(
            num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=scheduling_strategy, max_restarts=0
        )
        self.max_in_flight_per_actor = max_in_flight_per_actor
        self.max_replacements = max_replacements
        self.start_timeout_s = start_timeout_s
        self.replacements = 0
        self.peak_in_flight = 0  # most calls queued at once over the pool's life (backpressure is observable)
        self.slots = [_Slot(i, self._start(i, 0)) for i in range(size)]
        self._wait_ready(self.slots)

    def _actor_name(self, index: int, generation: int) -> str:
        return f"{self.name}-{index}" + (f".r{generation}" if generation else "")

    def _start(self, index: int, generation: int):
        return self._remote.options(name=self._actor_name(index, generation), **self._options).remote(
            *self._args, **self._kwargs
        )

    def _wait_ready(self, slots: list[_Slot]) -> None:
        """Wait until every actor has run its constructor.

        A constructor that raises (a missing model, a bad config) fails the pool at once with its error: every
        replacement would raise the same. An actor that died while starting (killed, OOM, its node lost) is
        replaced like one that dies mid-work, within `max_replacements`.
        """
        waiting = {s.actor.__ray_ready__.remote(): s for s in slots}
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while waiting:
                ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise PoolError(self._not_started(len(waiting)))
                [ref] = ready
                slot = waiting.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as e:
                    if e.actor_init_failed:
                        raise PoolError(f"{self.name}: an actor failed to start: {_cause(e)}") from None
                    self._replace(slot, f"died while starting: {_cause(e)}")
                    waiting[slot.actor.__ray_ready__.remote()] = slot
        except PoolError:
            self.shutdown()
            raise

    def _not_started(self, pending: int) -> str:
        asked = resources_text({"CPU": self._options["num_cpus"], "GPU": self._options["num_gpus"]})
        return (
            f"{self.name}: {pending} of {len(self.slots)} actors not started within {self.start_timeout_s:g} s; "
            f"each asks for {asked}, the cluster has free: {free_resources_text()} (lower the stage's num_actors "
            "or num_cpus_per_actor, or add nodes; a constructor still loading its model takes this long too)"
        )

    @property
    def actors(self) -> list:
        return [s.actor for s in self.slots]

    def _replace(self, slot: _Slot, reason: str) -> None:
        self.replacements += 1
        if self.replacements > self.max_replacements:
            raise PoolError(
                f"{self.name}: {self.replacements} actor deaths, more than max_replacements "
                f"{self.max_replacements}; last: {reason}"
            )
        log.warning(
            "%s: actor %s died (%s); starting a replacement",
            self.name,
            self._actor_name(slot.index, slot.generation),
            reason,
        )
        ray.kill(slot.actor, no_restart=True)
        slot.generation += 1
        slot.actor = self._start(slot.index, slot.generation)
        slot.in_flight = 0

    def map_unordered(
        self,
        method: str,
        items: Iterable[tuple[Any, Any]],
        max_attempts: int = 3,
        on_retry: Callable[[Any, str], None] | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Call `actor.<method>(payload)` for every (key, payload); yield (key, result) as calls finish.

        An item whose actor died is re-queued at the front without counting as an attempt (deaths are bounded by
        `max_replacements` instead); an item that raises is retried up to `max_attempts` in all, then
        `PoolError` names it.
        """
        pending = collections.deque(_Item(k, p) for k, p in items)
        in_flight: dict[ray.ObjectRef, tuple[_Slot, int, _Item]] = {}
        while pending or in_flight:
            self._dispatch(method, pending, in_flight)
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            slot, generation, item = in_flight.pop(ref)
            if generation == slot.generation:
                slot.in_flight -= 1
            try:
                result = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                self._actor_died(slot, generation, item, e)
                pending.appendleft(item)  # at the front: the item did nothing wrong
            except RayTaskError as e:
                item.errors.append(_cause(e))
                if item.attempts >= max_attempts:
                    raise PoolError(
                        f"{self.name}: item {item.key!r} failed {item.attempts} times; last error: {item.errors[-1]}"
                    ) from e.as_instanceof_cause()
                pending.append(item)
            else:
                yield item.key, result
                continue
            if on_retry:
                on_retry(item.key, item.errors[-1])

    def _dispatch(self, method: str, pending: collections.deque, in_flight: dict) -> None:
        """Fill every actor up to `max_in_flight_per_actor`, least busy first."""
        for slot in sorted(self.slots, key=lambda s: s.in_flight):
            while pending and slot.in_flight < self.max_in_flight_per_actor:
                item = pending.popleft()
                item.attempts += 1
                ref = getattr(slot.actor, method).remote(item.payload)
                in_flight[ref] = (slot, slot.generation, item)
                slot.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, len(in_flight))

    def _actor_died(self, slot: _Slot, generation: int, item: _Item, e: Exception) -> None:
        """An actor died under `item`: replace it once (on the first news of that death) and uncount the attempt."""
        if getattr(e, "actor_init_failed", False):  # a replacement's constructor raised: so would the next
            self.shutdown()
            raise PoolError(f"{self.name}: a replacement actor failed to start: {_cause(e)}") from None
        if generation == slot.generation:
            self._replace(slot, _cause(e))
        item.attempts -= 1  # the actor died under it: not the item's failure
        item.errors.append(f"actor died: {_cause(e)}")

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _cause(e: BaseException) -> str:
    """The innermost error message of a Ray exception, on one line."""
    if isinstance(e, RayTaskError):
        inner = e.as_instanceof_cause()
        text = str(getattr(inner, "cause", None) or inner)
    else:
        text = str(e)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(e).__name__


def resources_text(resources: dict[str, float]) -> str:  # what an actor or worker asks for, as `8 CPU + 1 GPU`
    return " + ".join(f"{v:g} {k}" for k, v in resources.items() if v) or "nothing"


def free_resources_text() -> str:
    """What the cluster has free, as `CPU 2 of 2, GPU 0 of 1`: for errors about a wait for resources."""
    free, total = ray.available_resources(), ray.cluster_resources()
    return ", ".join(f"{k} {free.get(k, 0):g} of {total[k]:g}" for k in ("CPU", "GPU") if k in total) or "nothing"


def torch_threads(num_cpus: float, num_gpus: float) -> int | None:
    """CPU threads for torch in an actor with these resources: its CPU share (at least one) on a CPU-only actor,
    so the actors of a node do not oversubscribe its cores; None (torch's default) on a GPU actor."""
    return max(1, int(num_cpus)) if num_gpus == 0 else None
