"""``axpo run CONFIG``: the whole system as local processes on one machine.

What it does, in order:

1. Validates the job spec and makes the run folder (``runs/<job>-<time>`` unless given):
   ``config.yaml`` (the spec as run), ``logs/<process>.log``, ``ports/``.
2. Prepares the model when the spec asks (``run.prepare_model``: build the tiny checkpoint,
   warm-start it) and the directory does not exist yet; later runs reuse it.
3. Starts a private Redis (``axpo.queue.redis_server``, AOF in the run folder) and the run's
   own api (``axpo serve api``, a token made for the run in ``api-token``, mode 0600, its URL
   in ``api-url``), submits the job spec through the Python client and acts as the
   deployment's runner for it in the job store (:mod:`axpo.local.run_job`): the job is
   ``running`` from here, and ``axpo job watch|cancel`` work from another shell. Then the verifier,
   tool and inference services, then the learner and ``run.rollout_workers`` rollout
   workers: each is ``axpo serve <service>`` with ``--port 0 --port-file`` and its settings
   in ``AXPO_<SERVICE>_*`` environment variables, the same entry points the containers use.
   It waits for each to write its port and answer gRPC health SERVING.
4. Feeds questions (``axpo.study.tasks.task_data``) onto the prompts stream, keeping
   ``max_prompt_backlog`` ahead of the workers, and shows live progress from the learner's
   ``metrics.jsonl`` (step, reward, accuracy, tool-call rate, all-wrong rate, ETA). Each step
   record also goes to the job store, with the checkpoints written and the weight version
   the inference service serves (events ``step``, ``checkpoint``, ``publish``).
5. When the learner exits after ``steps`` steps: with the job's ``eval``, stops the workers
   and evaluates the final policy through the same services (``axpo eval`` on their
   addresses: ``eval.json``, ``eval.jsonl``; with ``eval.before``, the starting policy too,
   before training: ``eval-before.*``); stops the services (SIGTERM, then SIGKILL after a
   grace period), ends the job ``succeeded`` and reads it back through the client (the
   summary's ``job_id``, ``api_url``, ``state``), writes ``report.md`` with plots, and stops
   the api and Redis last.

While it trains, a rollout worker, the tool server or the verifier that exits is restarted
(:class:`~axpo.local.processes.Supervisor`, the job's ``run.restarts``: exponential backoff,
a budget per process; tools and verifier on their old port). Each restart is said on stderr,
appended to ``restarts.jsonl`` and counted in the summary's ``restarts``; the run fails, with
the process's exit code and log tail, only when a budget is spent. A rollout worker's
unacknowledged questions are not lost: restarted under the same consumer name it reads them
again first. The inference service and the learner are not restarted: a new inference service
would serve the starting weights, not the last published version, until the learner publishes
again; a learner resumes from its checkpoint when its job is started again, which is the job
store's business, so here its crash fails the run with its log tail. A child that exits during
start-up fails the run too.

A cancel through the api (``axpo job cancel ID``, the job's cancel flag, polled every 0.5 s
while training and before each evaluation) stops the run: rollout workers first, then the
learner (SIGTERM: it checkpoints after its current step), then the services; the job ends
``cancelled``, ``summary.json`` says so and ``axpo run`` exits 1 with that message. Ctrl-C
(SIGINT) or SIGTERM at any point cancels the job through the client, stops every process the
same way and exits 130/143. A run that fails ends its job ``failed`` with the run's error.
Children also get SIGKILL from the kernel if the launcher itself dies (``PR_SET_PDEATHSIG``),
so no process outlives a run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from axpo.jobs import JobState
from axpo.local.processes import (
    Child,
    Interrupted,
    Processes,
    Restart,
    RunError,
    Supervisor,
    settings_env,
)
from axpo.local.progress import Progress
from axpo.local.run_job import RunJob, start_api, submit_and_claim
from axpo.settings.job import JobSpec


class JobCancelled(RunError):
    """The job was cancelled through the api; the message says after how many steps."""


@dataclass
class Launcher:
    """Runs one job on this machine (see the module docstring); its processes are
    :attr:`procs`."""

    spec: JobSpec
    spec_path: Path
    run_dir: Path
    python: str = sys.executable
    out: IO[str] = field(default_factory=lambda: sys.stderr)
    on_restart: Callable[[Restart], None] | None = None
    """Called for every restart of a process, after ``restarts.jsonl`` has it (see
    :meth:`_record_restart`)."""
    procs: Processes = field(init=False)
    supervisor: Supervisor = field(init=False)
    _services: tuple[Path, Child, Child, Child] | None = field(init=False, default=None)
    _running_eval: tuple[int, subprocess.Popen[str]] | None = field(init=False, default=None)
    _last_eval_step: int = field(init=False, default=0)
    job: RunJob | None = field(init=False, default=None)
    """The run's job in the store, once submitted (:mod:`axpo.local.run_job`)."""
    _api: Child | None = field(init=False, default=None)
    _steps_done: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.run_dir = self.run_dir.resolve()
        self.procs = Processes(self.run_dir, python=self.python, out=self.out)
        # Not the inference service or the learner: see the module docstring.
        restartable = {
            "tools",
            "verifier",
            *(f"rollout-{i}" for i in range(self.spec.run.rollout_workers)),
        }
        self.supervisor = Supervisor(
            self.procs, self.spec.run.restarts, frozenset(restartable), self._record_restart
        )

    def _record_restart(self, event: Restart) -> None:
        """Where a restart is recorded: ``restarts.jsonl`` in the run folder (one line each:
        the process, its exit code, which restart, the backoff, the time), then
        :attr:`on_restart` (for a job store's ``record_restart``)."""
        line = {k: v for k, v in asdict(event).items() if k != "log_tail"}
        line["time"] = time.time()
        with (self.run_dir / "restarts.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
        if self.job is not None:
            self.job.on_restart(event)
        if self.on_restart is not None:
            self.on_restart(event)

    def run(self, progress: bool = True) -> dict[str, Any]:
        spec = self.spec
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(
            yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
        )
        model = Path(spec.model)
        self._prepare_model(model)
        from axpo.queue import TrajectoryQueue, connect
        from axpo.queue.redis_server import RedisServerError
        from axpo.settings.queue import QueueSettings

        # Absolute: redis-server resolves its dir from its own working directory.
        queue_settings = QueueSettings(embedded_dir=str((self.run_dir / "redis").resolve()))
        try:
            client, self.procs.redis = connect(queue_settings)
        except RedisServerError as exc:
            raise RunError(str(exc)) from exc
        redis_url = self.procs.redis.url if self.procs.redis is not None else ""
        queue_env = {"redis_url": redis_url}
        queue = TrajectoryQueue(client, spec.name, QueueSettings(redis_url=redis_url))
        queue.ensure()
        started = time.monotonic()
        self.procs.say(f"run folder {self.run_dir}")
        self._start_job(client, redis_url)
        self.procs.say("starting verifier, tools, inference ...")
        verifier = self.procs.start("verifier", "verifier", {})
        tools = self.procs.start("tools", "tools", settings_env("AXPO_TOOLS_", spec.run.tools))
        inference = self.procs.start(
            "inference",
            "inference",
            {
                **settings_env("AXPO_INFERENCE_", spec.run.inference),
                "AXPO_INFERENCE_MODEL": str(model.resolve()),
                "AXPO_INFERENCE_SEED": str(spec.seed),
            },
        )
        self.procs.wait_ready([verifier, tools, inference], spec.run.startup_timeout_s)

        def target(child: Child, deadline_s: float) -> dict[str, Any]:
            return {"target": f"127.0.0.1:{child.port}", "deadline_s": deadline_s}

        metrics_path = self.run_dir / "metrics.jsonl"
        learner_values: dict[str, Any] = {
            "model": str(model.resolve()),
            "job_spec": str(self.spec_path.resolve()),
            "queue": queue_env,
            "checkpoint_dir": str(self.run_dir / "checkpoints"),
            "export_dir": str(self.run_dir / "final-model"),
            "publish_dir": str(self.run_dir / "publish"),
            "inference_targets": [target(inference, 600.0)],
            "metrics_path": str(metrics_path),
            "seed": spec.seed,
            "checkpoint_every": 1,
            **spec.run.learner,
        }
        # The learner acknowledges groups only at a checkpoint, and unacknowledged groups count
        # against the producers' backlog: the backlog must hold the groups of the steps between
        # checkpoints plus the next step, or the workers block and the learner waits forever.
        # Two steps ahead of the learner also bounds the policy lag of what is queued.
        every = int(learner_values["checkpoint_every"])
        backlog = spec.questions_per_step * (every + 2)
        learner_values["queue"] = {**queue_env, "max_backlog": backlog}
        self._services = (model, inference, tools, verifier)
        assert self.job is not None
        self.job.served_version = lambda: _served_version(inference)
        if spec.eval is not None and spec.eval.before:
            self._check_cancel()
            self._evaluate(name="eval-before")
            self._check_cancel()
        self.procs.say("starting learner and rollout workers ...")
        learner = self.procs.start(
            "learner", "learner", settings_env("AXPO_LEARNER_", learner_values)
        )
        workers = []
        for i in range(spec.run.rollout_workers):
            values = {
                "job_spec": str(self.spec_path.resolve()),
                "tokenizer": str(model.resolve()),
                "queue": {**queue_env, "max_backlog": backlog},
                "inference": target(inference, 600.0),
                "tools": target(tools, 120.0),
                "verifier": target(verifier, 120.0),
                "consumer": f"rollout-{i}",
            }
            workers.append(
                self.procs.start(f"rollout-{i}", "rollout", settings_env("AXPO_ROLLOUT_", values))
            )
        self.procs.wait_ready([learner, *workers], spec.run.startup_timeout_s)
        ready_s = time.monotonic() - started
        self.procs.say(f"all services ready in {ready_s:.0f} s; training {spec.steps} steps")
        records = self._train(queue, learner, metrics_path, progress)
        evaluation = None
        if spec.eval is not None:
            # The inference service holds the final weights: evaluate them through the same
            # services, with the workers stopped so nothing else samples meanwhile.
            self.procs.stop([*workers, learner])
            self._periodic_eval(len(records), final=True)
            self._check_cancel()
            evaluation = self._evaluate()
        stopping = time.monotonic()
        self.procs.stop_all(keep=[self._api] if self._api is not None else [])
        shutdown_s = time.monotonic() - stopping
        state = self.job.finish(JobState.SUCCEEDED)
        client.close()
        summary = {
            "run_dir": str(self.run_dir),
            "job_id": self.job.job_id,
            "api_url": self.job.api_url,
            "state": state,
            "steps": len(records),
            "startup_s": round(ready_s, 1),
            "wall_s": round(time.monotonic() - started, 1),
            "shutdown_s": round(shutdown_s, 1),
            # SIGTERM to exit per process (the workers and the learner stop before an eval).
            "stop_s": {
                c.name: round(c.stop_s, 1) for c in self.procs.children if c.stop_s is not None
            },
            "restarts": {
                n: self.supervisor.restarts[n] for n in sorted(self.supervisor.restartable)
            },
            "metrics": str(metrics_path),
        }
        if evaluation is not None:
            summary["eval"] = str(self.run_dir / "eval.json")
        summary["report"] = str(self._report())
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _start_job(self, redis_client: Any, redis_url: str) -> None:
        """The run's api, then the job submitted through the client and claimed (see
        :mod:`axpo.local.run_job`); says where to watch it from."""
        try:
            from axpo_client import ApiError, Client
        except ModuleNotFoundError as exc:
            raise RunError("axpo run needs the api client: pip install -e clients/python") from exc
        from axpo.jobs import JobStore

        self.procs.say("starting the api ...")
        timeout_s = self.spec.run.startup_timeout_s
        self._api, url, token = start_api(self.procs, redis_url, self.run_dir, timeout_s)
        client = Client(url, token)
        store = JobStore(redis_client)
        try:
            job_id = submit_and_claim(client, store, self.spec, self.run_dir)
        except ApiError as exc:
            raise RunError(f"submitting the job to the run's api at {url} failed: {exc}") from exc
        self.job = RunJob(
            store, client, job_id, url, self.run_dir / "checkpoints", say=self.procs.say
        )
        self.procs.say(
            f"job {job_id} running; api {url}, token in {self.run_dir / 'api-token'}; from "
            f"another shell: AXPO_API_URL=$(cat {self.run_dir / 'api-url'}) "
            f"AXPO_API_TOKEN=$(cat {self.run_dir / 'api-token'}) axpo job watch {job_id}"
        )

    def _check_cancel(self) -> None:
        """JobCancelled when the job's cancel flag is set (``axpo job cancel``, the api)."""
        if self.job is not None and self.job.cancel_requested():
            raise JobCancelled(
                f"job {self.job.job_id} was cancelled through the api after "
                f"{self._steps_done} of {self.spec.steps} steps; every process was stopped "
                f"(the learner checkpointed first: {self.run_dir / 'checkpoints'})"
            )

    def end_job(self, state: JobState, error: str | None = None, *, cancel: bool = False) -> None:
        """After the run stopped early: stop every process but the api (rollout workers
        first; the learner checkpoints on SIGTERM), then end the job as ``state`` and read it
        back through the client. With ``cancel``, cancel it through the client first (what
        Ctrl-C means). A cancelled job's ``summary.json`` says so. No-op without a job or when
        it has ended."""
        job = self.job
        if job is None or job.finished:
            return
        if cancel:
            job.cancel()
        self.stop_running_eval()
        self.procs.stop_all(keep=[self._api] if self._api is not None else [])
        final = job.finish(state, error)
        if state == JobState.CANCELLED:
            summary = {
                "run_dir": str(self.run_dir),
                "job_id": job.job_id,
                "api_url": job.api_url,
                "state": final,
                "steps": self._steps_done,
                "metrics": str(self.run_dir / "metrics.jsonl"),
            }
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.procs.say(f"job {job.job_id}: {final or 'state unknown'}")

    def _eval_cmd(self, out: Path, questions: int | None = None) -> list[str]:
        """``axpo eval`` of the job's ``eval`` on this run's running services."""
        e = self.spec.eval
        assert e is not None
        assert self._services is not None
        model, inference, tools, verifier = self._services
        return [
            *(self.python, "-m", "axpo", "eval"),
            *("--inference", f"127.0.0.1:{inference.port}"),
            *("--tools", f"127.0.0.1:{tools.port}", "--verifier", f"127.0.0.1:{verifier.port}"),
            *("--model", str(model.resolve()), "--config", str(self.run_dir / "config.yaml")),
            *("--out", str(out)),
            *e.cli_args(e.family_names(self.spec.tasks), questions),
        ]

    @staticmethod
    def _eval_summary(stdout: str, log: Path, what: str) -> dict[str, Any]:
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RunError(f"{what} printed no JSON; see {log}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def _evaluate(self, name: str = "eval") -> dict[str, Any]:
        """``axpo eval`` on the running services (the job's ``eval``), with whatever weights
        the inference service holds: writes ``<name>.json`` (the summary) and ``<name>.jsonl``
        (per question) in the run folder."""
        e = self.spec.eval
        assert e is not None
        self.procs.say(
            f"{name}: evaluating {'the final' if name == 'eval' else 'the starting'} policy on "
            f"{e.questions} {e.split} questions per family "
            f"({', '.join(e.family_names(self.spec.tasks))}), {e.n} samples each ..."
        )
        log = self.run_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = self._eval_cmd(self.run_dir / f"{name}.jsonl")
        with log.open("w") as err:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RunError(f"the evaluation {name} failed (exit {proc.returncode}); {log}:\n{tail}")
        result = self._eval_summary(proc.stdout, log, f"the evaluation {name}")
        (self.run_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    def stop_running_eval(self) -> None:
        """Kill an evaluation started by ``eval.every`` that is still running (a stopped run)."""
        if self._running_eval is not None:
            _, proc = self._running_eval
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self._running_eval = None

    def _periodic_eval(self, steps_done: int, final: bool = False) -> None:
        """The job's ``eval.every``: start an evaluation after every that many steps (one at a
        time, concurrently with training), and collect one that has finished into
        ``evals/step-<N>.json``. With ``final``, wait for a running one instead of starting."""
        e = self.spec.eval
        if e is None or e.every is None or self._services is None:
            return
        evals = self.run_dir / "evals"
        if self._running_eval is not None:
            step, proc = self._running_eval
            if final:
                proc.wait()
            if proc.poll() is None:
                return
            self._running_eval = None
            log = self.run_dir / "logs" / f"eval-step-{step}.log"
            out = (evals / f"step-{step}.out").read_text()
            if proc.returncode != 0:
                self.procs.say(f"warning: the evaluation at step {step} failed; see {log}")
            else:
                result = self._eval_summary(out, log, f"the evaluation at step {step}")
                result["step"] = step
                (evals / f"step-{step}.json").write_text(json.dumps(result, indent=2) + "\n")
        due = steps_done - steps_done % e.every
        if final or due == 0 or due >= self.spec.steps or due <= self._last_eval_step:
            return
        self._last_eval_step = due
        evals.mkdir(exist_ok=True)
        log = self.run_dir / "logs" / f"eval-step-{due}.log"
        with (evals / f"step-{due}.out").open("w") as out_file, log.open("w") as err:
            proc = subprocess.Popen(
                self._eval_cmd(evals / f"step-{due}.jsonl", e.every_questions),
                stdout=out_file,
                stderr=err,
                text=True,
            )
        self._running_eval = (due, proc)

    def _sft(self, base: Path, model: Path) -> None:
        """Demonstrations of the job's families (``axpo demos``), then ``axpo sft`` from
        ``base`` into ``model``."""
        run = self.spec.run
        families = ",".join(self.spec.tasks.family_names())
        demos = model.with_name(model.name + "-demos") / "demos.jsonl"
        self.procs.say(f"writing {run.demos.per_family} demonstrations per family ({families})")
        _check_call(
            [
                *(self.python, "-m", "axpo", "demos", "--config", str(self.spec_path)),
                *("--families", families, "--per-family", str(run.demos.per_family)),
                *("--tool-rate", str(run.demos.tool_rate), "--seed", str(run.demos.seed)),
                *("--out", str(demos)),
            ]
        )
        self.procs.say(f"SFT: {run.sft.steps} steps of {run.sft.batch_size} demonstrations ...")
        tmp = model.with_name(model.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier attempt's leftovers
        _check_call(
            [
                *(self.python, "-m", "axpo", "sft", "--model", str(base), "--data", str(demos)),
                *("--out", str(tmp), "--steps", str(run.sft.steps)),
                *("--batch-size", str(run.sft.batch_size), "--lr", str(run.sft.lr)),
                *("--seed", str(run.sft.seed), "--json"),
                *(["--train-vision"] if run.sft.train_vision else []),
            ]
        )
        tmp.rename(model)  # complete or absent

    def _prepare_model(self, model: Path) -> None:
        how = self.spec.run.prepare_model
        if model.is_dir():
            return
        if how == "none":
            raise RunError(f"model {model}: not a directory (set run.prepare_model to build one)")
        self.procs.say(f"building the tiny model at {model} ...")
        base = model if how == "tiny" else model.with_name(model.name + "-base")
        if not base.is_dir():
            pixels = self.spec.run.tiny_max_pixels if how == "tiny-sft" else 512 * 512
            _check_call(
                [
                    *(self.python, "-m", "axpo", "model", "tiny", "--out", str(base)),
                    *("--max-pixels", str(pixels)),
                ]
            )
        if how == "tiny-sft":
            self._sft(base, model)
        if how == "tiny-warm-start":
            self.procs.say(f"warm-starting it ({self.spec.run.warm_start_steps} steps) ...")
            tmp = model.with_name(model.name + ".partial")
            _check_call(
                [
                    self.python,
                    "-m",
                    "axpo",
                    "model",
                    "warm-start",
                    "--model",
                    str(base),
                    "--out",
                    str(tmp),
                    "--steps",
                    str(self.spec.run.warm_start_steps),
                    "--image-size",
                    str(self.spec.tasks.image_size),
                    "--seed",
                    str(self.spec.seed),
                ]
            )
            tmp.rename(model)  # complete or absent

    def _train(
        self, queue: Any, learner: Child, metrics_path: Path, progress: bool
    ) -> list[dict[str, Any]]:
        from axpo.jobs.feeder import PromptFeeder

        spec = self.spec
        feeder = PromptFeeder(queue, spec)
        records: list[dict[str, Any]] = []
        show = Progress(spec, self.out, enabled=progress)
        try:
            while True:
                feeder.top_up()
                records = self._new_records(metrics_path, records, show)
                self._periodic_eval(len(records))
                rc = learner.proc.poll()
                if rc is None:
                    self._check_cancel()
                else:
                    records = self._new_records(metrics_path, records, show)
                    if rc != 0 and len(records) >= spec.steps:
                        # Every step is trained, checkpointed and recorded; a crash while the
                        # interpreter tears down must not throw the run away, but is reported.
                        self.procs.say(
                            f"warning: the learner exited with code {rc} after its last step; "
                            f"see {learner.log_path}"
                        )
                    elif rc != 0 or len(records) < spec.steps:
                        raise RunError(
                            f"learner exited with code {rc} after {len(records)} of "
                            f"{spec.steps} steps; last lines of {learner.log_path}:\n"
                            + learner.log_tail()
                        )
                    return records
                # Restarts what may be restarted; RunError for anything else that exited.
                self.supervisor.check(skip=[learner])
                time.sleep(0.5)
        finally:
            show.close()

    def _new_records(
        self, path: Path, seen: list[dict[str, Any]], show: Progress
    ) -> list[dict[str, Any]]:
        """The learner's records so far (``axpo.study.report.load_metrics``: a torn last line is
        skipped); each new one goes to the progress display and to the job store."""
        from axpo.study.report import load_metrics

        if not path.exists():
            return seen
        records = load_metrics(path)
        for record in records[len(seen) :]:
            show.update(record)
            if self.job is not None:
                self.job.record(record)
        self._steps_done = len(records)
        return records

    def _report(self) -> Path:
        from axpo.study.report import write_report

        return write_report(
            self.run_dir,
            title=f"axpo run: {self.spec.name} ({self.spec.algorithm.name})",
            config_text=self.spec_path.read_text(),
        )


def _served_version(inference: Child) -> int | None:
    """The weight version the run's inference service serves (its ``Status``); None when it
    does not answer within 2 s (the next step's record asks again)."""
    import grpc

    from axpo.rpc.client import open_channel
    from axpo.settings.base import RpcClientSettings
    from axpo.v1 import inference_pb2, inference_pb2_grpc

    channel = open_channel(RpcClientSettings(target=f"127.0.0.1:{inference.port}"))
    try:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        resp = stub.Status(inference_pb2.InferenceServiceStatusRequest(), timeout=2.0)
        return int(resp.policy_version)
    except grpc.RpcError:
        return None
    finally:
        channel.close()


def _check_call(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RunError(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def run(
    spec_path: Path,
    *,
    run_dir: Path | None = None,
    progress: bool = True,
    out: IO[str] | None = None,
) -> dict[str, Any]:
    """Run the job in ``spec_path`` (see the module docstring); returns the summary.
    SIGINT/SIGTERM raise :class:`Interrupted`, a cancel through the api :class:`JobCancelled`
    (a RunError), after every process is stopped and the job ended."""
    from axpo.settings.job import load_job_spec

    spec = load_job_spec(spec_path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = run_dir or Path("runs") / f"{spec.name}-{stamp}"
    launcher = Launcher(spec, spec_path, run_dir, out=out or sys.stderr)

    def on_signal(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # How the job ends when the run stops early (a finished run has ended it already).
    ending: tuple[JobState, str | None, bool] = (JobState.FAILED, "axpo run stopped", False)
    try:
        return launcher.run(progress=progress)
    except Interrupted:
        launcher.procs.say("interrupted: cancelling the job and stopping every process ...")
        ending = (JobState.CANCELLED, None, True)
        raise
    except JobCancelled:
        launcher.procs.say("cancelled through the api: stopping every process ...")
        ending = (JobState.CANCELLED, None, False)
        raise
    except BaseException as exc:
        ending = (JobState.FAILED, str(exc) or type(exc).__name__, False)
        raise
    finally:
        # Signals during the shutdown must not cut it short.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        try:
            state, error, cancel = ending
            try:
                launcher.end_job(state, error, cancel=cancel)
            finally:
                launcher.stop_running_eval()
                launcher.procs.stop_all()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
