"""Settings of the learner (``axpo serve learner``, ``AXPO_LEARNER_*``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from axpo.settings.base import (
    LogSettings,
    RpcClientSettings,
    RpcServerSettings,
    ServiceSettings,
    service_settings,
)
from axpo.settings.queue import QueueSettings


class LearnerSettings(ServiceSettings):
    """The learner (``axpo serve learner``): consumes groups, trains, publishes weights."""

    model_config = service_settings("AXPO_LEARNER_")

    rpc: RpcServerSettings = RpcServerSettings(port=50054)
    """Where the LearnerService (status) listens."""
    log: LogSettings = LogSettings()
    """Logging."""
    model: str = ""
    """Checkpoint directory or hub name of the initial policy (the serving replicas' model)."""
    dtype: Literal["float32", "bfloat16", "bf16-mixed"] = "float32"
    """``float32`` or ``bfloat16``: parameter and compute dtype (optimizer states follow the
    parameters). ``bf16-mixed``: float32 parameters and AdamW states (the master weights), the
    forward and backward in bfloat16 (``torch.autocast`` in one process; FSDP2's
    ``MixedPrecisionPolicy`` under torchrun, gradients reduced in float32); weights are
    published in bfloat16, the dtype the inference replicas serve."""
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    """Where the model, its reference and every batch live: ``auto`` is this process's GPU
    (``cuda:LOCAL_RANK`` under torchrun) when CUDA is available, else ``cpu``; or ``cpu``,
    ``cuda``, ``cuda:N``. A CUDA device means NCCL under torchrun, ``cpu`` means gloo."""
    lr: Annotated[float, Field(gt=0)] = 1e-6
    """AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: Annotated[float, Field(gt=0)] = 1e-8
    """AdamW epsilon."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Linear learning-rate warmup over this many optimizer steps (then constant)."""
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    micro_batch_tokens: Annotated[int, Field(ge=1)] = 8192
    """Token budget of one micro-batch (padded tokens count); a longer sequence gets a
    micro-batch of its own. Gradients accumulate over the micro-batches of a step."""
    clip_low: Annotated[float, Field(ge=0, lt=1)] = 0.2
    """Lower clip range: the ratio is clipped at ``1 - clip_low``."""
    clip_high: Annotated[float, Field(ge=0)] = 0.2
    """Upper clip range: the ratio is clipped at ``1 + clip_high`` (DAPO clip-higher: 0.28)."""
    loss_aggregation: Literal["token", "sequence", "dr_grpo"] = "token"
    """``token``: mean over all loss tokens of the step (DAPO); ``sequence``: mean of
    per-sequence means (GRPO); ``dr_grpo``: sum over a constant ``n_seq * dr_grpo_length``."""
    dr_grpo_length: Annotated[int, Field(ge=1)] | None = None
    """``dr_grpo`` constant length (the generation budget); unset: the longest sequence."""
    scale_advantages_by_std: bool = True
    """Divide group-centred rewards by their std (GRPO); off for Dr.GRPO."""
    advantage_std_floor: Annotated[float, Field(gt=0)] = 1e-6
    """Smallest std advantages are divided by."""
    kl_coef: Annotated[float, Field(ge=0)] = 0.0
    """Weight of the k3 KL to the initial (reference) policy; 0 turns it off (no reference
    model is kept)."""
    behavior_logprobs: Literal["rollout", "learner"] = "rollout"
    """Old logprobs of the ratio: ``rollout`` (the inference engine's, a true importance ratio
    under policy lag) or ``learner`` (recomputed before the update: ratio 1 on the first pass)."""
    logprob_chunk_tokens: Annotated[int, Field(ge=0)] = 256
    """Positions whose vocabulary-wide logits exist at once while computing the sampled
    tokens' logprobs: the output head runs over this many trained positions at a time under
    activation checkpointing (peak memory one ``[chunk, vocab]`` float32 block, not the whole
    sequence's). 0: the reference path over the full logits (O(time x vocab) memory).
    Logprobs always follow each group's sampling (temperature, top-k, top-p, logit bias: see
    ``axpo_learner.logprobs``); there is no learner-side temperature to keep in step."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the model's layers (transformers'
    ``gradient_checkpointing_enable``, non-reentrant): activations are recomputed in the
    backward pass, trading ~30 % more compute for memory that no longer grows with depth."""
    reference_placement: Literal["device", "host"] = "device"
    """Where the KL reference model (``kl_coef > 0``) lives. ``device``: on the learner's
    device, sharded like the policy under torchrun (each rank holds its shard, not a full
    copy). ``host``: in (pinned) host memory, each module's weights copied to the device just
    for its forward and dropped after: no device memory for the reference, at the cost of one
    host-to-device copy of its weights per forward."""
    tis_cap: Annotated[float, Field(gt=0)] | None = None
    """Truncated importance sampling (off when unset): with ``behavior_logprobs: learner``, the
    old policy of the ratio is the learner's, but the tokens were sampled by the inference
    engine; each token's loss is then weighted by ``min(pi_learner_old / pi_rollout,
    tis_cap)`` (detached), correcting the engine-learner mismatch with a bounded weight
    (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"; a cap of 2 is their choice). With ``behavior_logprobs: rollout`` the ratio is
    already taken against the engine's logprobs and the weight is 1."""
    checkpoint_dir: str = ""
    """Directory of the learner's checkpoints (``step-<n>`` subdirectories); empty: none."""
    export_dir: str = ""
    """When set, after the last step (``max_steps``) the trained policy is written here as a
    complete HF checkpoint (the input ``model``'s dtype and every non-weight file of its
    directory; written atomically), loadable by transformers and vLLM; ``model`` must then be
    a local directory. Empty: no export."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 10
    """Checkpoint every this many optimizer steps."""
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    """Newest checkpoints kept; older ones are deleted after a new one is complete."""
    publish_every: Annotated[int, Field(ge=1)] = 1
    """Publish new weights to the inference replicas every this many optimizer steps."""
    publish_transport: Literal["path", "stream"] = "path"
    """``path``: safetensors in ``publish_dir`` plus LoadWeights; ``stream``: LoadWeightsStream
    chunks over gRPC (replicas without a shared volume)."""
    publish_dir: str = ""
    """Shared directory (tmpfs or shared volume) the ``path`` transport writes to."""
    publish_chunk_bytes: Annotated[int, Field(ge=1024)] = 4 << 20
    """Largest tensor chunk the ``stream`` transport sends."""
    inference_targets: list[RpcClientSettings] = Field(default_factory=list)
    """Inference replicas new weights go to (each confirms the version)."""
    max_policy_lag: Annotated[int, Field(ge=0)] = 4
    """Groups older than the current policy by more than this many versions are dropped
    (``axpo serve learner`` copies it into ``queue.max_policy_lag``)."""
    seed: int = 0
    """Seed of torch, Python and NumPy random streams of the learner."""
    job_id: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = "default"
    """Job whose groups stream the learner consumes (a job spec's ``name``)."""
    job_spec: str = ""
    """YAML job spec; when given, its ``name``, ``steps``, ``questions_per_step`` and
    ``algorithm`` replace ``job_id``, ``max_steps``, ``questions_per_step`` and the default
    algorithm."""
    job_store: bool = False
    """Take jobs from the deployment's job store (Redis: the queue's server and key prefix,
    where the api puts them) instead of ``job_spec``/``job_id``: claim the oldest queued job,
    train it (its ``steps``, ``questions_per_step``, ``algorithm``, ``seed`` and its
    ``run.learner`` fields but the deployment's: see ``axpo_learner.jobs``), feed its
    questions, record its progress, end it, and take the next; idle while none waits. A job
    left running by a crash is resumed from its checkpoint. Needs ``jobs_dir``."""
    jobs_dir: str = ""
    """With ``job_store``: each job's artefacts go to ``<jobs_dir>/<job id>/`` (``config.yaml``,
    ``metrics.jsonl``, ``checkpoints/``, ``final-model/``, ``report.md``, ``summary.json``)."""
    job_poll_s: Annotated[float, Field(gt=0)] = 1.0
    """With ``job_store``: how often an idle learner looks for a queued job, and a running
    one for its cancel flag, in seconds."""
    model_name: str = ""
    """With ``job_store``: another name jobs may give for ``model`` (a hub name such as
    ``Qwen/Qwen3-VL-2B-Thinking`` for the directory it was downloaded to). A job naming
    another model fails: a deployment serves one model."""
    queue: QueueSettings = QueueSettings()
    """The trajectory queue (Redis) the groups come from."""
    consumer: Annotated[str, Field(min_length=1)] = "learner-0"
    """Consumer name in the groups stream's consumer group. Keep it stable across restarts:
    entries taken but not acknowledged before a crash are redelivered to the same name."""
    questions_per_step: Annotated[int, Field(ge=1)] = 16
    """Groups (questions) per optimizer step."""
    max_steps: Annotated[int, Field(ge=0)] = 0
    """Stop after this many optimizer steps (counted across restarts); 0: run until stopped."""
    step_timeout_s: Annotated[float, Field(ge=0)] = 0.0
    """Once a step's first group has arrived, train on what has arrived after this many
    seconds (a partial step); 0: always wait for ``questions_per_step`` groups."""
    metrics_path: str = ""
    """JSON-lines file the learner appends one record per optimizer step to (the step's
    diagnostics, loss metrics and time split); empty: none."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Port of the learner's Prometheus ``/metrics`` with the latest step's values (0 picks
    one); unset: none."""
    redis_retry_s: Annotated[float, Field(gt=0)] = 120.0
    """How long the loop retries a Redis that does not answer (restarting, unreachable) before
    it gives up with an error."""
