"""The inference service on the tiny Qwen3-VL: vLLM (fp32, CPU) against transformers, prefix
resume, versioned weight loading (path and stream), the swap rule, and bad input through the
real gRPC server. One engine for the whole module (a vLLM start costs ~30-70 s here)."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from axpo.contracts import convert
from axpo.contracts.domain import FinishReason, Image, SamplingParams
from axpo.rpc.client import open_channel, wait_for_health
from axpo.settings.base import RpcClientSettings, RpcServerSettings
from axpo.settings.inference import InferenceSettings
from axpo.v1 import inference_pb2, inference_pb2_grpc

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from PIL import Image as PILImage  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from axpo.study.tiny_model import build_tiny_model  # noqa: E402
from axpo_inference.engine import InferenceEngine  # noqa: E402
from axpo_inference.errors import InvalidRequestError  # noqa: E402
from axpo_inference.sampling import to_sample  # noqa: E402
from axpo_inference.server import start  # noqa: E402

# The learner's own stream of a weight publication: what a replica really receives.
from axpo_learner.publish import weight_chunks  # noqa: E402

pytestmark = pytest.mark.integration

PAD = "<|vision_start|><|image_pad|><|vision_end|>"
MAX_PIXELS = 600 * 600


def _png(w: int, h: int, color: tuple[int, int, int]) -> Image:
    img = PILImage.new("RGB", (w, h), color)
    for x in range(0, w, 8):
        img.putpixel((x, x % h), (255 - color[0], x % 256, color[2]))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return Image.from_bytes(buf.getvalue(), "image/png")


def _pil(image: Image) -> Any:
    return PILImage.open(io.BytesIO(image.data)).convert("RGB")


IMG_A = _png(64, 96, (200, 30, 30))
IMG_B = _png(128, 64, (30, 30, 200))
ONE_IMAGE = (
    f"<|im_start|>user\n{PAD}What colour is the framed cell?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n"
)
TWO_IMAGES = (
    ONE_IMAGE
    + "Let me zoom.\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>\n"
    + f"<|im_start|>user\n<tool_response>\n{PAD}Zoomed.\n</tool_response><|im_end|>\n"
    + "<|im_start|>assistant\n<think>\n"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("inference") / "tiny", seed=0)


@pytest.fixture(scope="module")
def processor(model_dir: Path) -> Any:
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Any:
    settings = InferenceSettings(
        model=str(model_dir),
        max_model_len=1024,
        max_n=16,
        max_top_logprobs=8,
        max_image_pixels=MAX_PIXELS,
        rpc=RpcServerSettings(port=0, log_requests=False),
    )
    with InferenceEngine(settings) as eng:
        client = eng._llm.engine_core  # vLLM's ZMQ client, to check close() below
        yield eng
    # close() leaves no ZMQ socket open: an open one lets the garbage collector hang the
    # test session later, destroying its context with an infinite linger.
    sockets = [client.resources.input_socket, client.resources.output_socket]
    assert all(s is None or s.closed for s in sockets), sockets


@pytest.fixture(scope="module")
def stub(engine: InferenceEngine) -> Any:
    running = start(engine.settings, engine)
    channel = open_channel(RpcClientSettings(target=running.address, deadline_s=120))
    wait_for_health(channel, timeout_s=10)
    yield inference_pb2_grpc.InferenceServiceStub(channel)
    channel.close()
    running.stop(grace=1)


def _ids(processor: Any, text: str) -> list[int]:
    ids: list[int] = processor.tokenizer.encode(text, add_special_tokens=False)
    return ids


def _hf_greedy(
    model_dir: Path, processor: Any, text: str, images: list[Image], n: int, state: Any = None
) -> list[int]:
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected
        assert set(missing) <= {"lm_head.weight"}  # tied builds store no separate head
        model.tie_weights()
    inputs = processor(text=[text], images=[_pil(i) for i in images] or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


# --------------------------------------------------------------------------- generate


def test_greedy_matches_transformers_with_one_and_two_images(
    engine: InferenceEngine, processor: Any, model_dir: Path
) -> None:
    for text, images in ((ONE_IMAGE, [IMG_A]), (TWO_IMAGES, [IMG_A, IMG_B])):
        (sample,) = engine.generate(_ids(processor, text), images, GREEDY)
        assert list(sample.token_ids) == _hf_greedy(model_dir, processor, text, images, 16)
        assert sample.policy_version == 0


def test_scores_shapes_and_n(engine: InferenceEngine, processor: Any) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7, top_logprobs=4)
    samples = engine.generate(_ids(processor, ONE_IMAGE), [IMG_A], params)
    assert len(samples) == 3
    for s in samples:
        n = len(s.token_ids)
        assert 1 <= n <= 12
        sc = s.scores
        assert len(sc.logprobs) == len(sc.entropies) == n
        assert sc.top_k == 4
        assert len(sc.top_token_ids) == len(sc.top_logprobs) == 4 * n
        assert all(lp <= 0 for lp in sc.logprobs)
        assert all(0 < h <= 7.0 for h in sc.entropies)  # <= log(1024) + slack
        for i in range(n):  # each row sorted, best first
            row = sc.top_logprobs[i * 4 : (i + 1) * 4]
            assert list(row) == sorted(row, reverse=True)
        assert s.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    # greedy n > 1: identical samples (vLLM refuses greedy n > 1; the engine fans out)
    greedy = engine.generate(
        _ids(processor, ONE_IMAGE), [IMG_A], SamplingParams(n=2, temperature=0.0, max_tokens=8)
    )
    assert greedy[0].token_ids == greedy[1].token_ids


def test_vision_tokens_are_never_sampled(engine: InferenceEngine, processor: Any) -> None:
    # The random tiny model puts ~1/1000 of its mass on each of the 4 vision tokens: 3,000
    # sampled tokens would hold ~12 of them without the engine's logit bias.
    banned = set(engine.unsampled_token_ids)
    assert {engine.image_token_id, engine.video_token_id} <= banned
    assert len(banned) == 4
    params = SamplingParams(n=16, temperature=1.5, max_tokens=192, seed=11)
    samples = engine.generate(_ids(processor, ONE_IMAGE), [IMG_A], params)
    sampled = [t for s in samples for t in s.token_ids]
    assert len(sampled) > 1000
    assert not banned & set(sampled)


def test_stop_string_is_kept_and_reported(engine: InferenceEngine, processor: Any) -> None:
    ids = _ids(processor, ONE_IMAGE)
    (ref,) = engine.generate(ids, [IMG_A], GREEDY)
    tok = processor.tokenizer
    # a stop string the model does write: the text of its 4th greedy token (if distinctive)
    k = next(
        i
        for i in range(3, len(ref.token_ids))
        if (t := tok.decode([ref.token_ids[i]])).strip()
        and t not in tok.decode(list(ref.token_ids[:i]))
    )
    stop = tok.decode([ref.token_ids[k]])
    params = SamplingParams(temperature=0.0, max_tokens=16, stop_strings=(stop,))
    (s,) = engine.generate(ids, [IMG_A], params)
    assert s.finish_reason is FinishReason.STOP_SEQUENCE
    assert s.stop_string == stop
    assert s.token_ids == ref.token_ids[: k + 1]  # the stop text stays in the output
    # stop token ids: the id is kept too
    params = SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=(ref.token_ids[k],))
    (s,) = engine.generate(ids, [IMG_A], params)
    assert s.finish_reason is FinishReason.STOP_SEQUENCE
    assert s.token_ids[-1] == ref.token_ids[k]


def test_tool_call_stop_string_maps_to_stop_sequence(engine: InferenceEngine) -> None:
    # The random model never writes </tool_call>; check the mapping on vLLM's output shape.
    out = SimpleNamespace(
        token_ids=[5, 6], logprobs=None, finish_reason="stop", stop_reason="</tool_call>"
    )
    k = engine.settings.entropy_top_logprobs
    s = to_sample(out, SamplingParams(stop_strings=("</tool_call>",)), 3, k)
    assert (s.finish_reason, s.stop_string, s.policy_version) == (
        FinishReason.STOP_SEQUENCE,
        "</tool_call>",
        3,
    )
    eos = SimpleNamespace(token_ids=[5], logprobs=None, finish_reason="stop", stop_reason=None)
    assert to_sample(eos, SamplingParams(), 0, k).finish_reason is FinishReason.STOP


# --------------------------------------------------------------------------- resume


def test_resume_from_many_cut_points_gives_the_rest(
    engine: InferenceEngine, processor: Any
) -> None:
    prompt = _ids(processor, TWO_IMAGES)
    (full,) = engine.generate(prompt, [IMG_A, IMG_B], SamplingParams(temperature=0, max_tokens=24))
    out = full.token_ids
    for cut in (1, 3, 7, 12, 18, len(out) - 1):
        rest = engine.resume_from_prefix(
            prompt,
            out[:cut],
            [IMG_A, IMG_B],
            SamplingParams(temperature=0, max_tokens=len(out) - cut),
        )
        assert rest[0].token_ids == out[cut:], cut


def test_resume_through_grpc_reports_cached_tokens(stub: Any, processor: Any) -> None:
    prompt = _ids(processor, ONE_IMAGE) + _ids(processor, " grid cell" * 40)
    req = inference_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        images=[convert.image_to_proto(IMG_A)],
        sampling=convert.sampling_params_to_proto(SamplingParams(temperature=0, max_tokens=40)),
    )
    first = stub.Generate(req).samples[0]
    resp = stub.ResumeFromPrefix(
        inference_pb2.ResumeFromPrefixRequest(
            prompt_token_ids=prompt,
            prefix_token_ids=first.token_ids[:36],
            images=[convert.image_to_proto(IMG_A.reference())],  # known image: hash only
            sampling=convert.sampling_params_to_proto(SamplingParams(temperature=0, max_tokens=4)),
        )
    )
    assert list(resp.samples[0].token_ids) == list(first.token_ids[36:])
    assert resp.cached_prompt_tokens >= 32
    assert resp.prompt_tokens > len(prompt)  # placeholders expanded


# --------------------------------------------------------------------------- bad input


def _gen(prompt: list[int], images: list[Image] = (), **sampling: Any) -> Any:  # type: ignore[assignment]
    params = {"temperature": 0.0, "max_tokens": 4, **sampling}
    return inference_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        images=[convert.image_to_proto(i) for i in images],
        sampling=convert.sampling_params_to_proto(SamplingParams(**params)),
    )


def test_bad_requests_are_refused_naming_the_field(stub: Any, processor: Any) -> None:
    ids = _ids(processor, ONE_IMAGE)
    text = _ids(processor, "hello")
    big = _png(700, 700, (1, 2, 3))
    cases = [
        (_gen([*text, 5000]), f"prompt_token_ids[{len(text)}]"),
        (_gen([*text, -1]), "prompt_token_ids"),
        (_gen([]), "prompt_token_ids: empty"),
        (_gen(text, max_tokens=1024), "max_tokens"),
        (_gen(ids, [IMG_A], max_tokens=1000), "max_model_len"),
        (_gen(text, n=0), "sampling.n"),
        (_gen(text, n=17, temperature=1.0), "sampling.n"),
        (_gen(text, top_logprobs=9), "sampling.top_logprobs"),
        (_gen(text, temperature=-0.5), "sampling.temperature"),
        (_gen(text, top_p=1.5), "sampling.top_p"),
        (_gen(text, top_p=-0.1), "sampling.top_p"),
        (_gen(ids, []), "images"),
        (_gen(text, [IMG_A]), "images"),
        (_gen(ids, [Image.from_bytes(b"not an image", "image/png")]), "images[0].data"),
        (_gen(ids, [big]), "images[0]"),
        (_gen(ids, [Image(sha256="ab" * 32)]), "images[0].data"),
        (_gen(text, stop_token_ids=(4096,)), "sampling.stop_token_ids"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as info:  # noqa: PT012
            stub.Generate(request)
            pytest.fail(f"accepted: {field}")
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in info.value.details(), (field, info.value.details())
    resp = stub.Generate(_gen(ids, [IMG_A]))  # the engine is still up
    assert len(resp.samples[0].token_ids) == 4


def test_a_cancelled_call_is_aborted_in_vllm(
    stub: Any, engine: InferenceEngine, processor: Any
) -> None:
    # A speculative AXPO resample that is no longer needed: the client cancels the call and
    # the engine must stop generating for it (not run its tokens for nobody).
    ids = _ids(processor, ONE_IMAGE)
    room = engine.max_model_len - stub.Generate(_gen(ids, [IMG_A], max_tokens=1)).prompt_tokens
    request = _gen(ids, [IMG_A], n=16, temperature=1.0, max_tokens=room - 1, seed=3)
    call = stub.ResumeFromPrefix.future(
        inference_pb2.ResumeFromPrefixRequest(
            request_id="speculative-1",
            prompt_token_ids=request.prompt_token_ids[:-2],
            prefix_token_ids=request.prompt_token_ids[-2:],
            images=request.images,
            sampling=request.sampling,
        )
    )
    deadline = time.monotonic() + 60
    while engine.status().queue_depth == 0:  # admitted by vLLM
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.01)
    time.sleep(0.2)
    assert call.cancel()
    cancelled_at = time.monotonic()
    # 16 x ~900 tokens take several seconds here; aborted, they stop within an engine step.
    while engine.status().queue_depth > 0:
        assert time.monotonic() - cancelled_at < 1.0, "vLLM still runs the cancelled request"
        time.sleep(0.01)
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    resp = stub.Generate(_gen(ids, [IMG_A]))  # the service goes on
    assert len(resp.samples[0].token_ids) == 4


def test_status(stub: Any, engine: InferenceEngine) -> None:
    st = stub.Status(inference_pb2.InferenceServiceStatusRequest())
    assert st.backend in ("vllm-cpu", "vllm")
    assert st.max_model_len == 1024
    assert st.max_n == 16
    assert st.policy_version == engine.policy_version
    assert 0.0 <= st.kv_cache_usage <= 1.0


# --------------------------------------------------------------------------- weights

CHUNK_BYTES = 100_000  # several chunks per tensor


def _perturbed(model_dir: Path, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    state = load_file(str(model_dir / "model.safetensors"))
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def test_load_weights_path_and_stream_match_transformers(
    stub: Any, engine: InferenceEngine, processor: Any, model_dir: Path, tmp_path: Path
) -> None:
    ids = _ids(processor, ONE_IMAGE)
    engine.generate(ids, [IMG_A], GREEDY)  # the image is in the encoder cache before the swap
    v = engine.policy_version
    state = _perturbed(model_dir, 1)
    (tmp_path / "w").mkdir()
    save_file(state, str(tmp_path / "w" / "model.safetensors"))  # as a trainer writes it
    resp = stub.LoadWeights(
        inference_pb2.LoadWeightsRequest(path=str(tmp_path / "w"), policy_version=v + 1)
    )
    assert resp.policy_version == v + 1
    assert resp.tensors_loaded == len(state)
    (s,) = engine.generate(ids, [IMG_A], GREEDY)
    assert s.policy_version == v + 1
    assert list(s.token_ids) == _hf_greedy(model_dir, processor, ONE_IMAGE, [IMG_A], 16, state)

    state2 = _perturbed(model_dir, 2)
    resp2 = stub.LoadWeightsStream(weight_chunks(state2, v + 2, CHUNK_BYTES))
    assert resp2.policy_version == v + 2
    assert resp2.bytes_received == sum(t.numel() * 4 for t in state2.values())
    (s2,) = engine.generate(ids, [IMG_A], GREEDY)
    assert s2.policy_version == v + 2
    assert list(s2.token_ids) == _hf_greedy(model_dir, processor, ONE_IMAGE, [IMG_A], 16, state2)


@pytest.mark.parametrize("loader", ["direct", "vllm"])
def test_each_weight_loader_matches_transformers_from_a_file(
    engine: InferenceEngine,
    processor: Any,
    model_dir: Path,
    tmp_path: Path,
    loader: str,
) -> None:
    """The default loader ("direct": one pause that resets the caches, the file straight into
    vLLM's in-place reload, embedding tables loaded into their live parameters, no
    input-embedding re-pack) and the generic one ("vllm") give transformers' outputs on the
    loaded weights, with images whose encoder outputs were cached under the old weights. (The
    tied head: tests/e2e/test_inference_serve.py.)"""
    ids = _ids(processor, TWO_IMAGES)
    engine.generate(ids, [IMG_A, IMG_B], GREEDY)  # both images enter the encoder cache
    v = engine.policy_version
    state = _perturbed(model_dir, 7 if loader == "direct" else 8)
    save_file(state, str(tmp_path / "w.safetensors"))  # a file, not a directory
    previous = engine.weight_loader
    engine.weight_loader = loader
    try:
        result = engine.load_weights_from_path(tmp_path / "w.safetensors", v + 1)
    finally:
        engine.weight_loader = previous
    assert (result.policy_version, result.tensors_loaded) == (v + 1, len(state))
    if loader == "direct":
        assert {"drain_ms", "pause_and_reset_ms", "load_rpc_ms", "resume_ms"} <= set(
            result.stages_ms
        )
        assert result.stages_ms["worker_embeddings_in_place"] == 2  # input table and head
        assert result.stages_ms["worker_embeddings_not_packed"] == 1  # the input table
        assert result.stages_ms["worker_repacked_head"] == 0  # re-packed by the reload
    else:
        assert "reload_rpc_ms" in result.stages_ms
    (s,) = engine.generate(ids, [IMG_A, IMG_B], GREEDY)
    assert s.policy_version == v + 1
    want = _hf_greedy(model_dir, processor, TWO_IMAGES, [IMG_A, IMG_B], 16, state)
    assert list(s.token_ids) == want


def test_an_unknown_weight_loader_is_refused(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AXPO_WEIGHT_LOADER", "nccl")
    with pytest.raises(InvalidRequestError, match="AXPO_WEIGHT_LOADER"):
        InferenceEngine(InferenceSettings(model=str(model_dir)))  # before vLLM starts


def test_bad_weight_loads_are_refused_and_the_engine_serves(
    stub: Any, engine: InferenceEngine, processor: Any, model_dir: Path, tmp_path: Path
) -> None:
    v = engine.policy_version
    state = load_file(str(model_dir / "model.safetensors"))
    save_file(state, str(tmp_path / "ok.safetensors"))
    with pytest.raises(grpc.RpcError) as info:  # not increasing
        stub.LoadWeights(
            inference_pb2.LoadWeightsRequest(
                path=str(tmp_path / "ok.safetensors"), policy_version=v
            )
        )
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "policy_version" in info.value.details()

    renamed = dict(state)
    renamed["model.bogus.weight"] = renamed.pop("lm_head.weight")
    save_file(renamed, str(tmp_path / "names.safetensors"))
    reshaped = dict(state)
    reshaped["lm_head.weight"] = reshaped["lm_head.weight"][:-1].clone()
    save_file(reshaped, str(tmp_path / "shapes.safetensors"))
    for name, hint in (("names", "unknown tensor"), ("shapes", "shape"), ("nowhere", "path")):
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadWeights(
                inference_pb2.LoadWeightsRequest(
                    path=str(tmp_path / f"{name}.safetensors"), policy_version=v + 1
                )
            )
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, name
        assert hint in info.value.details(), info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # a stream with a wrong shape
        stub.LoadWeightsStream(weight_chunks(reshaped, v + 1, CHUNK_BYTES))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk.shape" in info.value.details()
    assert engine.policy_version == v
    (s,) = engine.generate(_ids(processor, ONE_IMAGE), [IMG_A], GREEDY)
    assert len(s.token_ids) == 16
    assert s.policy_version == v


def test_swap_drains_in_flight_requests(
    engine: InferenceEngine, processor: Any, model_dir: Path, tmp_path: Path
) -> None:
    ids = _ids(processor, ONE_IMAGE)
    v = engine.policy_version
    save_file(_perturbed(model_dir, 3), str(tmp_path / "model.safetensors"))
    long = SamplingParams(n=2, temperature=1.0, max_tokens=200, seed=1)
    done: list[tuple[float, Any]] = []

    def run() -> None:
        samples = engine.generate(ids, [IMG_A], long)
        done.append((time.perf_counter(), samples))

    with ThreadPoolExecutor(8) as pool:
        before = [pool.submit(run) for _ in range(4)]
        time.sleep(0.5)  # they are running
        load = pool.submit(engine.load_weights_from_path, tmp_path, v + 1)
        time.sleep(0.05)
        during = [pool.submit(engine.generate, ids, [IMG_A], GREEDY) for _ in range(2)]
        result = load.result(timeout=300)
        loaded_at = time.perf_counter()
        for f in before:
            f.result()
        after = [s for f in during for s in f.result()]
    assert result.policy_version == v + 1
    assert len(done) == 4
    for finished_at, samples in done:
        assert {s.policy_version for s in samples} == {v}  # admitted before the swap
        assert finished_at <= loaded_at  # drained before the new weights served
    assert {s.policy_version for s in after} == {v + 1}  # waited for the new weights


def test_concurrent_requests_are_batched(engine: InferenceEngine, processor: Any) -> None:
    ids = _ids(processor, ONE_IMAGE)
    params = SamplingParams(temperature=1.0, max_tokens=64, seed=5)
    start = time.perf_counter()
    engine.generate(ids, [IMG_A], params)
    one = time.perf_counter() - start
    lock = threading.Lock()
    count = [0]

    def run(_: int) -> None:
        engine.generate(ids, [IMG_A], params)
        with lock:
            count[0] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(run, range(8)))
    eight = time.perf_counter() - start
    assert count[0] == 8
    assert eight < 4 * one  # 8 concurrent requests cost far less than 8 sequential ones


def test_load_weights_from_tensors_restores_the_original_model(
    engine: InferenceEngine, processor: Any, model_dir: Path
) -> None:
    ids = _ids(processor, TWO_IMAGES)
    v = engine.policy_version
    original = load_file(str(model_dir / "model.safetensors"))
    result = engine.load_weights_from_tensors(original.items(), v + 10)
    assert (result.policy_version, result.tensors_loaded) == (v + 10, len(original))
    (s,) = engine.generate(ids, [IMG_A, IMG_B], GREEDY)
    assert s.policy_version == v + 10
    assert list(s.token_ids) == _hf_greedy(model_dir, processor, TWO_IMAGES, [IMG_A, IMG_B], 16)


# --------------------------------------------------------------------------- the learner


QWEN_THINKING = SamplingParams(n=8, temperature=0.6, top_p=0.95, top_k=20, max_tokens=32, seed=3)
# Mean |logprob_learner - logprob_engine| per sampled token (measured 5.9e-7 on the tiny model,
# fp32 vLLM CPU vs transformers; ignoring temperature, top-p or top-k measured 0.063, 0.042,
# 2.7).
MISMATCH_TOLERANCE = 1e-3


def _learner_mismatch(model: Any, processor: Any, group: Any) -> dict[str, float]:
    """Mean and max |learner - engine| logprob over the sampled tokens of ``group``."""
    from axpo.settings.job import AlgorithmSpec
    from axpo_learner.batch import ImageEncoder, collate, rows_from_groups
    from axpo_learner.logprobs import token_logprobs

    enc = ImageEncoder(processor)
    rows = rows_from_groups([group], AlgorithmSpec(), images=enc)
    mb = collate(rows, processor.tokenizer.pad_token_id, enc.image_token_id)
    mask = mb.loss_mask[:, 1:]
    with torch.no_grad():
        logp, _ = token_logprobs(
            model, mb, [r.processing for r in rows], chunk_tokens=16, positions=mask
        )
    d = (logp - mb.rollout_logprobs[:, 1:])[mask].abs()
    return {"mean": float(d.mean()), "max": float(d.max()), "tokens": float(mask.sum())}


def test_learner_logprobs_match_the_engines_under_qwen_sampling(
    engine: InferenceEngine, processor: Any, model_dir: Path
) -> None:
    """Fresh samples at Qwen's Thinking-model settings (temperature 0.6, top-p 0.95, top-k 20):
    the learner, applying the group's reported processing, agrees with vLLM's processed
    logprobs; ignoring any one of the three puts it far outside the tolerance."""
    import dataclasses

    from axpo.contracts.domain import Group, LogprobProcessing, Reward, Trajectory
    from axpo_learner.trainer import load_policy

    prompt = _ids(processor, ONE_IMAGE)
    samples = engine.generate(prompt, [IMG_A], QWEN_THINKING)
    how = samples[0].processing
    assert how is not None
    assert (how.temperature, how.top_p, how.top_k, how.processed) == (0.6, 0.95, 20, True)
    assert engine.image_token_id in how.biased_token_ids
    assert how.logit_bias == -100.0
    trajs = tuple(
        Trajectory(
            trajectory_id=f"t{i}",
            token_ids=(*prompt, *s.token_ids),
            loss_mask=(False,) * len(prompt) + (True,) * len(s.token_ids),
            logprobs=(0.0,) * len(prompt) + s.scores.logprobs,
            entropies=(0.0,) * (len(prompt) + len(s.token_ids)),
            segments=(),
            prompt_length=len(prompt),
            image_sha256=(IMG_A.sha256,),
            reward=Reward.zero("unscored"),
        )
        for i, s in enumerate(samples)
    )
    group = Group("g", "q", trajs, images=(IMG_A,), sampling=how)
    model, _ = load_policy(model_dir)
    model.eval()
    got = _learner_mismatch(model, processor, group)
    assert got["tokens"] >= 8 * 8
    assert got["mean"] < MISMATCH_TOLERANCE, got
    for ignored in ({"temperature": 1.0}, {"top_p": 1.0}, {"top_k": 0}):
        wrong = dataclasses.replace(group, sampling=dataclasses.replace(how, **ignored))
        off = _learner_mismatch(model, processor, wrong)
        print(f"mismatch ignoring {ignored}: {off}")
        assert off["mean"] > 10 * MISMATCH_TOLERANCE, (ignored, off, got)
    plain = dataclasses.replace(group, sampling=LogprobProcessing())
    assert _learner_mismatch(model, processor, plain)["mean"] > 10 * MISMATCH_TOLERANCE
    print(f"mismatch at T=0.6/top-p 0.95/top-k 20: {got}")
