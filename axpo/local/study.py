"""``axpo study CONFIG``: the miniature study on one machine, stage by stage, resumable.

1. The base checkpoint: ``base_model.path`` or the tiny random-init Qwen3-VL built in the study
   folder with the study's image pixel budget.
2. Demonstrations (``axpo demos``) of the study's families on *training* seeds, then SFT
   (``axpo sft``): one checkpoint, ``sft/model``, that every arm starts from.
3. The SFT checkpoint's held-out evaluation (``axpo eval``): the common "before".
4. For each seed, each arm in order: ``axpo run`` of the arm's job from ``sft/model``, which
   evaluates its final policy on the held-out questions through the same services
   (``eval.json``, ``eval.jsonl`` in the run folder). An arm with ``match_tokens_of`` runs as
   many steps as match the named arm's generated tokens on the same seed (the equal-compute
   control; ``configs/study-tiny.yaml`` says why steps rather than a larger group).
5. ``report.md`` (:mod:`axpo.study.study_report`): Pass@k per arm and family with 95 %
   intervals, training curves per arm, compute per arm.

Every stage writes ``done.json`` with the inputs it ran on; a rerun of the same spec skips
stages whose inputs match (so a stopped study continues where it stopped, and a changed arm
reruns only what depends on it). Each stage is a child process (the CLI), so the services' and
the learner's code stay out of this process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from axpo.local.processes import RunError
from axpo.settings.study import ArmSpec, StudySpec


def _stage_done(folder: Path, inputs: dict[str, Any], marker_name: str = "done.json") -> bool:
    marker = folder / marker_name
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("inputs") == inputs)
    except (OSError, ValueError):
        return False


def _mark_done(
    folder: Path, inputs: dict[str, Any], result: dict[str, Any], marker_name: str = "done.json"
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{marker_name}.tmp"
    tmp.write_text(json.dumps({"inputs": inputs, "result": result}, indent=2) + "\n")
    tmp.replace(folder / marker_name)


def _result(folder: Path, marker_name: str = "done.json") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / marker_name).read_text())["result"]
    return data


def total_tokens(metrics_path: Path) -> float:
    """Generated tokens over a run (the sum of ``generated_tokens`` over its steps)."""
    total = 0.0
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                value = json.loads(line).get("generated_tokens")
            except ValueError:
                continue
            if isinstance(value, int | float):
                total += value
    return total


@dataclass
class Study:
    """Runs one study (module docstring) in ``out_dir``."""

    spec: StudySpec
    out_dir: Path
    python: str = sys.executable
    out: IO[str] = field(default_factory=lambda: sys.stderr)
    progress: bool = True
    runner: Callable[..., dict[str, Any]] | None = None
    """``axpo.local.launcher.run`` (injectable for tests)."""

    def say(self, text: str) -> None:
        print(f"[study {time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    def _axpo(self, *args: str, log: Path) -> str:
        """Run ``axpo ARGS`` as a child process; its stderr goes to ``log``; returns stdout."""
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "axpo", *args]
        with log.open("w") as err:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RunError(f"`axpo {args[0]}` failed (exit {proc.returncode}); {log}:\n{tail}")
        return proc.stdout

    @staticmethod
    def _last_json(stdout: str) -> dict[str, Any]:
        for line in reversed(stdout.strip().splitlines()):
            if line.startswith("{"):
                data: dict[str, Any] = json.loads(line)
                return data
        raise RunError(f"expected a JSON line on stdout, got: {stdout[-500:]!r}")

    # ------------------------------------------------------------------ stages

    def base_model(self) -> Path:
        b = self.spec.base_model
        path = Path(b.path) if b.path else self.out_dir / "base-model"
        if (path / "config.json").is_file():
            return path
        if not b.build_tiny:
            raise RunError(f"base model {path}: not a checkpoint (set base_model.build_tiny)")
        from axpo.study.tiny_model import build_tiny_model

        self.say(f"building the tiny model at {path} (pixel budget {b.max_pixels}) ...")
        tmp = path.with_name(path.name + ".partial")
        build_tiny_model(tmp, seed=b.seed, max_pixels=b.max_pixels)
        tmp.rename(path)
        return path

    def job_file(self, sft_model: Path) -> Path:
        """The first arm's job on the first seed: the settings demos and evaluation use."""
        job = self.spec.arm_job(
            self.spec.arms[0], seed=self.spec.seeds[0], model=str(sft_model), steps=None
        )
        path = self.out_dir / "job.yaml"
        path.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
        return path

    def demos(self, job_file: Path) -> Path:
        d = self.spec.demos
        folder = self.out_dir / "sft" / "demos"
        inputs = {"demos": d.model_dump(), "families": self.spec.families, "job": self.spec.job}
        path = folder / "demos.jsonl"
        if _stage_done(folder, inputs):
            return path
        self.say(f"writing {d.per_family} demonstrations per family ...")
        stdout = self._axpo(
            "demos",
            "--config",
            str(job_file),
            "--families",
            ",".join(self.spec.families),
            "--per-family",
            str(d.per_family),
            "--tool-rate",
            str(d.tool_rate),
            "--seed",
            str(d.seed),
            "--out",
            str(path),
            log=folder / "demos.log",
        )
        _mark_done(folder, inputs, self._last_json(stdout))
        return path

    def sft(self, base: Path, demos: Path) -> Path:
        s = self.spec.sft
        folder = self.out_dir / "sft"
        model = folder / "model"
        inputs = {
            "sft": s.model_dump(),
            "demos": _result(demos.parent),
            "base": str(base.resolve()),
        }
        if _stage_done(folder, inputs) and (model / "config.json").is_file():
            return model
        self.say(f"SFT: {s.steps} steps of {s.batch_size} demonstrations ...")
        args = [
            "sft",
            "--model",
            str(base),
            "--data",
            str(demos),
            "--out",
            str(model),
            "--steps",
            str(s.steps),
            "--batch-size",
            str(s.batch_size),
            "--lr",
            str(s.lr),
            "--seed",
            str(s.seed),
            "--save-every",
            str(max(1, s.steps // 4)),
            "--resume",
            "--json",
        ]
        if s.train_vision:
            args.append("--train-vision")
        started = time.monotonic()
        result = self._last_json(self._axpo(*args, log=folder / "sft.log"))
        result["wall_s"] = round(time.monotonic() - started, 1)
        _mark_done(folder, inputs, result)
        return model

    def eval_model(self, model: Path, job_file: Path, folder: Path) -> dict[str, Any]:
        e = self.spec.eval
        inputs = {"eval": e.model_dump(), "model": str(model.resolve()), "job": self.spec.job}
        if _stage_done(folder, inputs, "eval-done.json"):
            return _result(folder, "eval-done.json")
        self.say(f"evaluating {model} on {e.questions} {e.split} questions per family ...")
        args = [
            *("eval", "--model", str(model), "--config", str(job_file)),
            *("--out", str(folder / "eval.jsonl"), "--run-dir", str(folder / "eval-services")),
            *e.cli_args(list(self.spec.families)),
        ]
        result = self._last_json(self._axpo(*args, log=folder / "eval.log"))
        (folder / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        _mark_done(folder, inputs, result, "eval-done.json")
        return result

    def arm_steps(self, arm: ArmSpec, seed: int) -> int:
        steps = int(self.spec.arm_job(arm, seed=seed, model="m", steps=None).steps)
        if arm.match_tokens_of is None:
            return steps
        names = [a.name for a in self.spec.arms]
        reference = next(
            (
                a
                for a in self.spec.arms[: names.index(arm.name)]
                if a.algorithm == arm.algorithm and a.match_tokens_of is None
            ),
            None,
        )
        if reference is None:
            raise RunError(
                f"arm {arm.name}: no earlier arm with the same algorithm to measure its tokens "
                "per step on"
            )
        target = total_tokens(self.run_dir(arm.match_tokens_of, seed) / "metrics.jsonl")
        own = total_tokens(self.run_dir(reference.name, seed) / "metrics.jsonl")
        if target <= 0 or own <= 0:
            raise RunError(f"arm {arm.name}: no generated tokens logged to match on")
        return max(1, math.ceil(steps * target / own))

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out_dir / "arms" / arm / f"seed-{seed}"

    def arm(self, arm: ArmSpec, seed: int, sft_model: Path) -> dict[str, Any]:
        run_dir = self.run_dir(arm.name, seed)
        steps = self.arm_steps(arm, seed)
        job = self.spec.arm_job(arm, seed=seed, model=str(sft_model.resolve()), steps=steps)
        inputs = {"job": job.model_dump(mode="json")}
        if _stage_done(run_dir, inputs):
            return _result(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl", "eval.json", "eval.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)
        job_path = run_dir.parent / f"seed-{seed}.yaml"
        job_path.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
        self.say(f"arm {arm.name}, seed {seed}: {steps} steps ...")
        runner = self.runner
        if runner is None:
            from axpo.local import launcher

            runner = launcher.run
        started = time.monotonic()
        summary = runner(job_path, run_dir=run_dir, progress=self.progress, out=self.out)
        summary["wall_s"] = round(time.monotonic() - started, 1)
        summary["generated_tokens"] = total_tokens(run_dir / "metrics.jsonl")
        summary["steps_run"] = steps
        if not (run_dir / "eval.json").is_file():
            raise RunError(f"arm {arm.name}, seed {seed}: the run wrote no eval.json")
        summary["eval"] = json.loads((run_dir / "eval.json").read_text())
        _mark_done(run_dir, inputs, summary)
        return summary

    # ------------------------------------------------------------------ all of it

    def run(self) -> dict[str, Any]:
        from axpo.study.study_report import write_study_report

        started = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "study.yaml").write_text(
            yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False)
        )
        base = self.base_model()
        sft_model = self.out_dir / "sft" / "model"
        job_file = self.job_file(sft_model)
        demos = self.demos(job_file)
        self.sft(base, demos)
        if self.spec.eval_sft != "none":
            self.eval_model(sft_model, job_file, self.out_dir / "sft")
        for seed in self.spec.seeds:
            for arm in self.spec.arms:
                self.arm(arm, seed, sft_model)
        wall = round(time.monotonic() - started, 1)
        report = write_study_report(self.out_dir, self.spec, wall_s=wall)
        self.say(f"done in {wall:.0f} s: {report}")
        return {"out_dir": str(self.out_dir), "report": str(report), "wall_s": wall}
