"""axpo_learner.logprobs: the sampler's processing (against vLLM's own code) and the lean path.

The processing is checked against vLLM's functions on random logits; the memory-lean chunked
head against the full-logits reference on the tiny Qwen3-VL model, values and gradients.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from axpo.contracts.domain import Group, LogprobProcessing, Reward, Trajectory
from axpo.settings.job import AlgorithmSpec
from axpo.settings.learner import LearnerSettings
from axpo.study.tiny_model import build_tiny_model
from axpo_learner.batch import collate, rows_from_groups
from axpo_learner.logprobs import filter_mask, processed_logprobs, token_logprobs
from axpo_learner.trainer import Trainer, load_policy

QWEN = LogprobProcessing(temperature=0.6, top_p=0.95, top_k=20)


def vllm_processed(logits: torch.Tensor, how: LogprobProcessing) -> torch.Tensor:
    """What vLLM's sampler reports as processed logprobs, through its own functions."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    z = logits.clone().float()
    if how.biased_token_ids:
        z[:, list(how.biased_token_ids)] += how.logit_bias
    z = z / how.temperature
    n = z.shape[0]
    k = torch.full((n,), how.top_k, dtype=torch.long) if how.top_k else None
    p = torch.full((n,), how.top_p) if how.top_p < 1 else None
    z = apply_top_k_top_p_pytorch(z, k, p)
    return z.log_softmax(-1)


@pytest.mark.parametrize(
    "how",
    [
        QWEN,
        LogprobProcessing(temperature=1.3),
        LogprobProcessing(top_k=5),
        LogprobProcessing(top_p=0.7),
        LogprobProcessing(
            temperature=0.6, top_k=50, top_p=0.9, biased_token_ids=(3, 4), logit_bias=-100
        ),
    ],
)
def test_processing_matches_vllms_sampler(how):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=gen) * 3
    want = vllm_processed(logits, how)
    kept = torch.isfinite(want)
    # Targets the engine could have sampled: one kept token per row.
    targets = torch.multinomial(want.exp(), 1, generator=gen)[:, 0]
    logp, entropy = processed_logprobs(logits, targets, how)
    torch.testing.assert_close(logp, want.gather(-1, targets[:, None])[:, 0], atol=1e-5, rtol=0)
    p = want.exp()
    ent = -(torch.where(kept, p * want, torch.zeros_like(p))).sum(-1)
    torch.testing.assert_close(entropy, ent, atol=1e-5, rtol=0)
    z = logits / how.temperature
    if how.biased_token_ids:
        z[:, list(how.biased_token_ids)] += how.logit_bias / how.temperature
    assert torch.equal(filter_mask(z, how.top_k, how.top_p), kept)


def test_the_sampled_token_stays_in_the_filter():
    logits = torch.tensor([[5.0, 4.0, 3.0, -9.0]])
    outside = torch.tensor([3])  # outside the top 2: kept anyway, with a finite logprob
    logp, _ = processed_logprobs(logits, outside, LogprobProcessing(top_k=2))
    assert torch.isfinite(logp).all()
    inside, _ = processed_logprobs(logits, torch.tensor([0]), LogprobProcessing(top_k=2))
    torch.testing.assert_close(inside, torch.log_softmax(logits[:, :2], -1)[:, 0])


@pytest.mark.parametrize(
    ("temperature", "want"), [(0.0, 1.0), (5e-6, 1.0), (0.005, 0.01), (0.6, 0.6)]
)
def test_small_temperatures_follow_vllms_rules(temperature, want):
    from axpo.contracts.domain import SamplingParams

    how = LogprobProcessing.of(SamplingParams(temperature=temperature, top_k=20))
    assert how.temperature == pytest.approx(want)
    assert how.top_k == (0 if want == 1.0 else 20)  # greedy: no filter


def test_raw_logprobs_ignore_the_processing():
    logits = torch.randn(4, 50)
    targets = torch.tensor([1, 2, 3, 4])
    raw = dataclasses.replace(QWEN, processed=False)
    logp, _ = processed_logprobs(logits, targets, raw)
    want = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(logp, want)


# --------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def groups(seed: int, sampling: LogprobProcessing, rollout_logprob: float = -5.0) -> list[Group]:
    rng = random.Random(seed)
    out = []
    for g in range(2):
        prompt = [rng.randrange(10, 900) for _ in range(5)]
        trajs = []
        for i in range(3):
            n = rng.randrange(3, 30)
            ids = tuple(prompt + [rng.randrange(10, 900) for _ in range(n)])
            trajs.append(
                Trajectory(
                    trajectory_id=f"g{g}t{i}",
                    token_ids=ids,
                    loss_mask=(False,) * len(prompt) + (True,) * n,
                    logprobs=(rollout_logprob,) * len(ids),
                    entropies=(0.0,) * len(ids),
                    segments=(),
                    prompt_length=len(prompt),
                    reward=Reward(float(i % 2), bool(i % 2), i % 2, 0, 0, "", "", ""),
                )
            )
        out.append(Group(f"g{g}", f"q{g}", tuple(trajs), sampling=sampling))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_lean_path_equals_the_full_logits_path_values_and_gradients(tiny, chunk):
    model, processor = load_policy(tiny)
    rows = rows_from_groups(groups(0, QWEN) + groups(1, LogprobProcessing()), AlgorithmSpec())
    mb = collate(rows, pad_id=processor.tokenizer.pad_token_id)
    how = [r.processing for r in rows]
    assert len(set(how)) == 2  # two processings in one micro-batch
    mask = mb.loss_mask[:, 1:]

    def run(chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logp, ent = token_logprobs(model, mb, how, chunk_tokens=chunk_tokens, positions=mask)
        (logp * mask * torch.linspace(-1, 1, logp.shape[1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logp.detach(), ent, grads

    ref_logp, ref_ent, ref_grads = run(0)
    logp, ent, grads = run(chunk)
    assert (ref_logp[mask] < 0).all()  # real values where trained...
    assert (ref_logp[~mask] == 0).all()
    assert (logp[~mask] == 0).all()
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    assert len(grads) > 10
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # The head's forward is the class's again, and the model still returns real logits.
    assert "forward" not in vars(model.get_output_embeddings())
    out = model(input_ids=mb.input_ids[:1, :4], use_cache=False).logits
    assert out.shape[-1] == model.config.text_config.vocab_size


def test_a_trainer_step_is_the_same_on_both_paths(tiny):
    base = {"model": str(tiny), "lr": 1e-3, "seed": 1}
    full = Trainer(LearnerSettings(**base, logprob_chunk_tokens=0))
    lean = Trainer(LearnerSettings(**base, logprob_chunk_tokens=5))
    m_full = full.train_step(groups(2, QWEN))
    m_lean = lean.train_step(groups(2, QWEN))
    for key in ("loss", "entropy", "logprob_mismatch_mean", "grad_norm"):
        assert m_lean[key] == pytest.approx(m_full[key], rel=1e-4, abs=1e-6), key
    # (Weights after AdamW are not compared: its normalised update turns gradients equal to
    # 1e-9 into steps of +-lr. The gradients themselves are, in the test above.)


def test_gradient_checkpointing_gives_the_same_step(tiny):
    base = {"model": str(tiny), "lr": 1e-3, "seed": 1}
    plain = Trainer(LearnerSettings(**base))
    ckpt = Trainer(LearnerSettings(**base, gradient_checkpointing=True))
    assert ckpt.model.is_gradient_checkpointing
    assert not plain.model.is_gradient_checkpointing
    a, b = plain.train_step(groups(3, QWEN)), ckpt.train_step(groups(3, QWEN))
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_the_learner_follows_each_groups_sampling(tiny):
    """Same tokens, two processings: the learner's logprobs (seen through the mismatch against
    rollout logprobs of -5) differ, so the group's sampling is what the learner applied."""
    t = Trainer(LearnerSettings(model=str(tiny), lr=1e-9, seed=1))
    plain = t.train_step(groups(4, LogprobProcessing()))
    qwen = t.train_step(groups(4, QWEN))
    # Near-uniform tiny model, vocabulary ~1,000: plainly ~log(1/1000) = -6.9 against -5;
    # under temperature 0.6 and top-k 20 the sampled tokens get far more mass (measured 1.95
    # and 0.80).
    assert plain["logprob_mismatch_mean"] > 1.5
    assert qwen["logprob_mismatch_mean"] < plain["logprob_mismatch_mean"] - 0.5


def test_truncated_importance_weights(tiny):
    base = {"model": str(tiny), "lr": 1e-3, "seed": 1, "behavior_logprobs": "learner"}
    t = Trainer(LearnerSettings(**base, tis_cap=2.0))
    m = t.train_step(groups(5, QWEN, rollout_logprob=-50.0))
    # pi_learner / pi_rollout is far above 2 (rollout logprobs -50): every weight is capped.
    assert m["is_weight"] == pytest.approx(2.0)
    off = Trainer(LearnerSettings(**base)).train_step(groups(5, QWEN, rollout_logprob=-50.0))
    assert "is_weight" not in off
    # The weight multiplies the policy-gradient term: the loss doubles.
    assert abs(off["pg_loss"]) > 1e-3
    assert m["pg_loss"] == pytest.approx(2 * off["pg_loss"], rel=1e-5)


def test_a_micro_batch_with_nothing_to_train_still_has_a_gradient(tiny):
    model, processor = load_policy(tiny)
    rows = rows_from_groups(groups(6, QWEN), AlgorithmSpec())
    mb = collate(rows, pad_id=processor.tokenizer.pad_token_id)
    nothing = torch.zeros_like(mb.loss_mask[:, 1:])
    logp, _ = token_logprobs(model, mb, QWEN, chunk_tokens=8, positions=nothing)
    assert (logp == 0).all()
    assert logp.requires_grad
    logp.sum().backward()  # no error: a zero gradient through the head
    head = model.get_output_embeddings().weight
    assert head.grad is not None
    assert (head.grad == 0).all()


def test_a_model_that_changes_logits_after_its_head_is_refused_on_the_lean_path(tiny):
    model, processor = load_policy(tiny)
    model.config.text_config.final_logit_softcapping = 30.0
    rows = rows_from_groups(groups(7, QWEN), AlgorithmSpec())
    mb = collate(rows, pad_id=processor.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        token_logprobs(model, mb, QWEN, chunk_tokens=8)
    token_logprobs(model, mb, QWEN, chunk_tokens=0)  # the full path applies whatever it does
