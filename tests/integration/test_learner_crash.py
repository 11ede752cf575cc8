"""The learner loop in a real process, killed with SIGKILL during a step, between its
checkpoint and its ack, and between steps, and Redis killed and restarted under it: in the
end every group was trained exactly once.

"Trained" means durably: each checkpoint records the queue entry ids of the steps it adds, so
the chain of checkpoints (kept in full here) is the trained history; a step lost in a crash is
in no checkpoint and its groups come back. Each produced entry must be in exactly one
checkpoint, and the queue must be empty with nothing pending.
"""

from __future__ import annotations

import json
import queue as stdqueue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from axpo.queue import TrajectoryQueue
from axpo.settings.learner import LearnerSettings
from axpo.settings.queue import QueueSettings
from axpo_learner import checkpoint
from tests.integration import learner_fixtures, redis_fixtures
from tests.integration.learner_fixtures import text_group
from tests.integration.redis_fixtures import new_job_id

fresh_redis_server = redis_fixtures.fresh_redis_server
tiny_model = learner_fixtures.tiny_model

pytestmark = pytest.mark.integration

# The learner loop with windows to be killed in, announced on stdout: "train N" (step N is
# running), "saved N" (checkpoint N written, its entries not yet acknowledged), "acked N".
_LEARNER = """
import faulthandler, logging, sys, time
faulthandler.dump_traceback_later(60, repeat=False)  # a hang leaves its stack in the log
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
import redis
from axpo.settings.job import AlgorithmSpec
from axpo.settings.learner import LearnerSettings
from axpo.queue import TrajectoryQueue
from axpo_learner import checkpoint
from axpo_learner.loop import LearnerLoop
from axpo_learner.trainer import Trainer

settings = LearnerSettings.model_validate_json(sys.argv[1])
q = TrajectoryQueue(redis.Redis.from_url(sys.argv[2]), sys.argv[3], settings.queue)
trainer = Trainer(settings)

def say(*words):
    print(*words, flush=True)

def wrap(fn, word, pause_s, step):
    def wrapped(*args, **kwargs):
        if word == "train":
            say(word, step() + 1)
            time.sleep(pause_s)
        out = fn(*args, **kwargs)
        if word != "train":
            say(word, step())
            time.sleep(pause_s)
        return out
    return wrapped

current = lambda: trainer.step
trainer.train_step = wrap(trainer.train_step, "train", 0.3, current)
checkpoint.save = wrap(checkpoint.save, "saved", 0.3, current)
q.ack_groups = wrap(q.ack_groups, "acked", 0.05, current)
LearnerLoop(settings, AlgorithmSpec(), q, trainer).run()
say("done", trainer.step)
"""


class Learner:
    """One life of the learner process; ``wait_for("saved 2")`` reads its stdout."""

    def __init__(self, settings: LearnerSettings, url: str, job: str, log: Path) -> None:
        self._err = log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LEARNER, settings.model_dump_json(), url, job],
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        self.lines: stdqueue.Queue[str] = stdqueue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def wait_for(self, wanted: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except stdqueue.Empty:
                raise AssertionError(f"no {wanted!r} from the learner in {timeout_s} s") from None
            if line == wanted:
                return
            if line == "<eof>":
                raise AssertionError(f"learner exited ({self.proc.wait()}) before {wanted!r}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.close()

    def close(self) -> None:
        if self.proc.stdout:
            self.proc.stdout.close()
        self._err.close()


def test_every_group_is_trained_exactly_once_through_crashes(
    fresh_redis_server, tiny_model, tmp_path
):
    job = new_job_id()
    # All groups come from version 0: a lag bound above max_steps keeps them from going stale.
    qs = QueueSettings(block_ms=100, claim_idle_ms=2_000, max_policy_lag=100, key_prefix=f"p{job}")
    settings = LearnerSettings(
        model=str(tiny_model),
        lr=1e-3,
        seed=1,
        queue=qs,
        job_id=job,
        questions_per_step=2,
        max_steps=8,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every=2,
        keep_checkpoints=100,
        redis_retry_s=30,
    )
    client = fresh_redis_server.client()
    q = TrajectoryQueue(client, job, qs)
    ids = [q.put_group(text_group(f"g{i}")) for i in range(16)]
    url, log = fresh_redis_server.url, tmp_path / "learner.log"

    def life() -> Learner:
        return Learner(settings, url, job, log)

    try:
        first = life()
        first.wait_for("train 2")  # step 1 trained but not checkpointed (every 2 steps)
        first.kill()  # during step 2
        second = life()
        second.wait_for("saved 2")
        second.kill()  # checkpoint 2 written, its entries not acknowledged
        third = life()
        third.wait_for("acked 4")
        third.kill()  # between steps
        last = life()
        last.wait_for("train 6")
        fresh_redis_server.kill()  # Redis dies during a step...
        time.sleep(0.5)
        fresh_redis_server.restart()
        last.wait_for("saved 6")
        fresh_redis_server.kill()  # ...and between a checkpoint and its ack
        time.sleep(0.5)
        fresh_redis_server.restart()
        last.wait_for("done 8")
        assert last.proc.wait(30) == 0
        last.close()
    except BaseException:
        print(log.read_text()[-4000:])
        raise

    chain: list[str] = []
    for path in checkpoint.list_checkpoints(tmp_path / "ckpt"):
        chain += json.loads((path / "meta.json").read_text())["consumed_entry_ids"]
    assert sorted(chain) == sorted(ids)  # every group in a checkpoint...
    assert len(chain) == len(set(chain))  # ...exactly once
    client = fresh_redis_server.client()
    q = TrajectoryQueue(client, job, qs)
    assert q.backlog() == 0
    assert q.pending() == 0
    assert q.counters().consumed == 16
    assert checkpoint.list_checkpoints(tmp_path / "ckpt")[-1].name == "step-00000008"
    assert "redis unavailable" in log.read_text()  # the outage did reach the learner
    client.close()
