"""AXPO's resampling of a group: :class:`AxpoResampling` (a base of
:class:`~axpo_rollout.agent.loop.AgentLoop`).

With ``algorithm.name == "axpo"`` and :func:`axpo.algorithm.needs_resampling` (the group's
tool-using originals are all wrong): candidates, the top ``rho`` by uncertainty, and for each
kept prefix one ``ResumeFromPrefix`` with ``n=K`` whose continuations run the same loop; the
frozen prefix (tokens, logprobs, entropies, segments, tool calls and images before the anchor
call) is copied verbatim from the original.

**Speculative resampling** (``algorithm.speculative_resampling``, off by default, with
``tool_call_anchor: first``). The prefixes AXPO would keep depend only on the first turns
(:func:`axpo.algorithm.speculative_prefixes`): the tool users are the rollouts whose first turn
called a tool, and the uncertainty is measured on that call. So the loop starts those
``ResumeFromPrefix`` calls right after the first turn, while the originals still run; it
scores each tool-using original as soon as it finishes, and the moment one is correct (the
condition cannot hold) it cancels them (:class:`CancelToken`: the gRPC call is cancelled and
the inference service aborts the vLLM request; a continuation stops before its next turn).
If the condition holds once every original is scored, the speculative resamples are exactly
the ones the sequential order would have asked for (same prefixes, same counts), only
started earlier; a kept prefix without one (never, with ``anchor: first``) is resumed then.
A group's latency becomes about max(original, first turn + resample) instead of their sum.
:attr:`AgentLoop.speculation` counts launched, used and cancelled resumes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace

from axpo.algorithm import selection as algorithm
from axpo.contracts.domain import Reward, ToolSpec, Trajectory
from axpo.settings.job import JobSpec
from axpo.study.tasks import Task
from axpo_rollout.agent.backend import Backend, PromptTooLongError
from axpo_rollout.agent.cancel import CancelToken
from axpo_rollout.agent.rollout import RolloutRunner
from axpo_rollout.agent.state import RolloutState, Timings, to_trajectory
from axpo_rollout.agent.vocab import Vocab


@dataclass
class SpeculationCounters:
    """Speculative AXPO resumes (one per kept prefix): started, kept in a group, cancelled."""

    launched: int = 0
    used: int = 0
    cancelled: int = 0


@dataclass
class Speculation:
    """One speculative resume in flight: its resamples, its token, and its timings (merged
    into the group's when it is used)."""

    future: Future[list[RolloutState]]
    token: CancelToken
    timings: Timings


class AxpoResampling(RolloutRunner):
    """Resumes of a group's kept prefixes, sequential or speculative (module docstring), on
    threads of their own; :attr:`speculation` counts the speculative ones."""

    def __init__(
        self,
        backend: Backend,
        vocab: Vocab,
        spec: JobSpec,
        tool_specs: Sequence[ToolSpec],
        *,
        pool: Executor | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(backend, vocab, spec, tool_specs, pool=pool, seed=seed)
        # Resume calls wait on continuations in ``pool``: they get threads of their own.
        self._resumers = ThreadPoolExecutor(max_workers=64, thread_name_prefix="resume")
        self.speculation = SpeculationCounters()
        self._spec_lock = threading.Lock()

    def close(self) -> None:
        super().close()
        self._resumers.shutdown(wait=False, cancel_futures=True)

    def _speculate(
        self, group_id: str, states: Sequence[RolloutState], callers: Sequence[bool]
    ) -> dict[tuple[int, int, int], Speculation]:
        """Start the resumes AXPO will want if its condition holds (module docstring), keyed by
        (rollout, prefix length, resamples). Call before the originals continue: the frozen
        prefixes are copied from their first-turn states here."""
        alg = self.spec.algorithm
        partial = [to_trajectory(f"{group_id}-{i}", s, None) for i, s in enumerate(states)]
        kept = algorithm.speculative_prefixes(partial, callers, score=alg.uncertainty, rho=alg.rho)
        counts = algorithm.resample_counts(len(kept), alg.group_size, alg.resamples_per_prefix)
        out: dict[tuple[int, int, int], Speculation] = {}
        for cand, k in zip(kept, counts, strict=True):
            frozen = states[cand.trajectory_index].prefix(cand.prefix_length, self.vocab)
            token, timings = CancelToken(), Timings()
            future = self._resumers.submit(self._resume, frozen, k, timings, token)
            out[(cand.trajectory_index, cand.prefix_length, k)] = Speculation(
                future, token, timings
            )
        with self._spec_lock:
            self.speculation.launched += len(out)
        return out

    def _cancel(self, speculations: Iterable[Speculation]) -> None:
        n = 0
        for s in speculations:
            if not s.token.cancelled:
                s.token.cancel()
                n += 1
        with self._spec_lock:
            self.speculation.cancelled += n

    def _score_originals(
        self,
        futures: Sequence[Future[RolloutState]],
        callers: Sequence[bool],
        task: Task,
        timings: Timings,
        speculative: dict[tuple[int, int, int], Speculation],
    ) -> list[Reward]:
        """The originals' rewards, in order. With speculative resumes running, each tool user
        is scored as soon as it finishes and a correct one cancels them; the rest are scored
        in one batch at the end (without speculation: all in one batch)."""
        rewards: dict[int, Reward] = {}
        if speculative:
            index = {id(f): i for i, f in enumerate(futures)}
            users = [f for f, c in zip(futures, callers, strict=True) if c]
            for fut in as_completed(users):
                [reward] = self.score([fut.result()], task, timings)
                rewards[index[id(fut)]] = reward
                if reward.correct:
                    self._cancel(speculative.values())
        rest = [i for i in range(len(futures)) if i not in rewards]
        states = [futures[i].result() for i in rest]
        if states:
            rewards.update(zip(rest, self.score(states, task, timings), strict=True))
        return [rewards[i] for i in range(len(futures))]

    def _resample(
        self,
        task: Task,
        group_id: str,
        states: Sequence[RolloutState],
        originals: Sequence[Trajectory],
        timings: Timings,
        speculative: dict[tuple[int, int, int], Speculation],
        on_resampling: Callable[[], object] | None = None,
    ) -> list[tuple[Trajectory, RolloutState]]:
        alg = self.spec.algorithm
        candidates = algorithm.prefix_candidates(
            originals, anchor=alg.tool_call_anchor, score=alg.uncertainty
        )
        kept = algorithm.select_prefixes(candidates, alg.rho)
        counts = algorithm.resample_counts(len(kept), alg.group_size, alg.resamples_per_prefix)
        pending: list[tuple[algorithm.PrefixCandidate, Future[list[RolloutState]]]] = []
        used: list[Speculation] = []
        for cand, k in zip(kept, counts, strict=True):
            spec = speculative.pop((cand.trajectory_index, cand.prefix_length, k), None)
            if spec is not None:
                used.append(spec)
                pending.append((cand, spec.future))
            else:
                frozen = states[cand.trajectory_index].prefix(cand.prefix_length, self.vocab)
                pending.append((cand, self._resumers.submit(self._resume, frozen, k, timings)))
        self._cancel(speculative.values())  # not kept (the condition does not hold)
        with self._spec_lock:
            self.speculation.used += len(used)
        if pending and on_resampling is not None:
            on_resampling()
        resampled: list[tuple[algorithm.PrefixCandidate, RolloutState]] = []
        for cand, fut in pending:
            resampled += [(cand, s) for s in fut.result()]
        for spec in used:
            timings.merge(spec.timings)
        out: list[tuple[Trajectory, RolloutState]] = []
        if not resampled:
            return out
        rewards = self.score([s for _, s in resampled], task, timings)
        for j, ((cand, state), reward) in enumerate(zip(resampled, rewards, strict=True)):
            traj = to_trajectory(f"{group_id}-r{j}", state, reward)
            traj = replace(
                traj, resampled_from=cand.trajectory_id, frozen_prefix_length=cand.prefix_length
            )
            out.append((traj, state))
        return out

    def _resume(
        self,
        frozen: RolloutState,
        k: int,
        timings: Timings,
        cancel: CancelToken | None = None,
    ) -> list[RolloutState]:
        budget = self._budget(frozen)
        if budget < 1:
            return []
        if cancel is not None:
            cancel.check()
        prompt = frozen.tokens[: frozen.prompt_length]
        prefix = frozen.tokens[frozen.prompt_length :]
        t0 = time.perf_counter()
        try:
            samples = self.backend.resume(
                prompt, prefix, frozen.images, self.sampling(k, budget), cancel=cancel
            )
        except PromptTooLongError:
            return []
        finally:
            timings.add("generate_s", time.perf_counter() - t0)
        return self._branch(frozen, samples, timings, cancel)
