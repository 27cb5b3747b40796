"""`lowalign plan`: a breakdown and a verdict from config.json alone, fixes that really fit, and estimates
within 25% of measured peaks (CPU RSS here; the same comparison runs on a GPU in benchmarks/plan_accuracy.py)."""

import dataclasses
import importlib.util
import json

import pytest

from lowalign.api import load_config
from lowalign.config import ConfigError
from lowalign.planner import GiB, MiB, parse_size, plan
from tests.algorithms.helpers import REPO, cli

_spec = importlib.util.spec_from_file_location("plan_accuracy", REPO / "benchmarks" / "plan_accuracy.py")
plan_accuracy = importlib.util.module_from_spec(_spec)  # the benchmark's own setups (benchmarks/ is no package)
_spec.loader.exec_module(plan_accuracy)


def test_plan_prints_breakdown_and_verdict_without_weights():
    p = cli("plan", "recipes/grpo_qwen_gsm8k.yaml", "--gpu-memory", "8GB", env={"HF_HUB_OFFLINE": "1"})
    out = p.stdout
    for term in ("base weights", "adapters and heads", "gradients + AdamW state", "forward_backward", "rollout",
                 "largest term", "verdict: fits in 8.0 GiB"):
        assert term in out, out
    assert "Qwen/Qwen2.5-0.5B-Instruct" in out and "nf4" in out


def test_too_small_a_card_gets_changes_that_fit():
    p = cli("plan", "recipes/grpo_qwen_gsm8k.yaml", "--gpu-memory", "2.1GB", "--json", check=False,
            env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 1, p.stderr
    r = json.loads(p.stdout)
    assert r["fits"] is False and r["on_card_bytes"] > 2.1 * GiB and r["fixes"]
    cfg0 = load_config(REPO / "recipes/grpo_qwen_gsm8k.yaml")
    for overrides, est in r["fixes"]:  # each suggestion, planned again, fits
        cfg = load_config(REPO / "recipes/grpo_qwen_gsm8k.yaml", overrides.split())
        assert plan(cfg).on_card == est <= 2.1 * GiB
    assert plan(cfg0).on_card == r["on_card_bytes"]


def test_terms_follow_the_config():
    base = ["model.name_or_path=builtin:tiny", "data.max_prompt_tokens=64"]
    q = str(REPO / "recipes/grpo_qwen_gsm8k.yaml")
    def term(p, name):
        return dict((n, b) for n, b, _ in p.static + p.phases)[name]

    nf4, bf16 = (plan(load_config(q, ["model.quantization=" + x])) for x in ("nf4", "none"))
    # block linears at ~0.52 B instead of 2; embeddings stay bf16
    assert 0.4 < term(nf4, "base weights") / term(bf16, "base weights") < 0.7
    ck, no = (plan(load_config(q, base + [f"model.gradient_checkpointing={x}"]), device="cpu")
              for x in ("true", "false"))
    assert term(ck, "forward_backward") < term(no, "forward_backward")
    small = plan(load_config(q, base + ["train.micro_batch_size=4"]), device="cpu")
    assert term(small, "forward_backward") < term(ck, "forward_backward")
    # a bf16 base does not halve the training pass: every LoRA module keeps an fp32 copy of its input (the
    # adapter's dtype); on SmolLM2 with all projections targeted that is ~0.9 of the fp32 pass, not ~0.55
    o = ["train.micro_batch_size=16", "model.gradient_checkpointing=false"]
    fp32, half = (plan(load_config(str(REPO / "recipes/grpo_smollm2.yaml"), o + [f"model.dtype={d}"]), device="cpu")
                  for d in ("float32", "bfloat16"))
    assert 0.8 < term(half, "forward_backward") / term(fp32, "forward_backward") < 1.0


def test_bad_sizes_and_unknown_models_are_named():
    assert parse_size("8GB") == 8 * GiB and parse_size("512MiB") == 512 * MiB and parse_size("24g") == 24 * GiB
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_size("eight")
    p = cli("plan", "recipes/grpo_tiny.yaml", "model.name_or_path=nobody/unknown-model", check=False,
            env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "nobody/unknown-model" in p.stderr and "catalog" in p.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("plan")
    plan_accuracy.prepare(w)
    return w


@pytest.mark.parametrize("setup", ["grpo-tiny", "dpo-tiny", "rm-tiny", "essa-tiny", "grpo-152k", "dpo-152k",
                                   "rm-152k", "essa-152k"])
def test_estimate_within_25_percent_of_measured_peak(work, setup):
    est = plan_accuracy.estimate(setup, work, "cpu").peak
    measured = plan_accuracy.measure(setup, work)
    assert abs(est / measured - 1) <= 0.25, (setup, est / MiB, measured / MiB)


def test_nproc_plans_one_process_share_and_refuses_a_batch_that_does_not_split():
    """`lowalign plan --nproc K`: each torchrun process holds the model and 1/K of the batch, so the rollout
    phase shrinks and the weights do not; a batch that does not split is refused by name, as torchrun is."""
    tiny = ["model.name_or_path=builtin:tiny", "data.max_prompt_tokens=64"]
    one, two = (json.loads(cli("plan", "recipes/grpo_qwen_gsm8k.yaml", *tiny, "--json", "--nproc", k).stdout)
                for k in ("1", "2"))
    assert two["phases"]["rollout"] < one["phases"]["rollout"]
    assert two["static"]["base weights"] == one["static"]["base weights"]
    assert any("per process of 2" in n for n in two["notes"])
    odd = ["train.prompts_per_step=3", "train.micro_batch_size=8"]
    p = cli("plan", "recipes/grpo_qwen_gsm8k.yaml", *tiny, *odd, "--nproc", "2", check=False)
    assert p.returncode != 0 and "does not split over 2 processes" in p.stderr


# ---- train.micro_batch_size: auto -------------------------------------------------------------------------


def test_auto_micro_batch_fits_the_budget_on_a_real_model():
    from lowalign.planner import fit_memory

    def fit(budget):
        return fit_memory(load_config("recipes/grpo_smollm2.yaml", [f"train.memory_budget={budget}"]), "cpu")

    big, small = fit("64GB"), fit("2.5GB")
    assert (big.micro_batch_size, big.gradient_checkpointing) == (64, False)  # everything fits: one batch
    assert small.peak <= 2.5 * 2**30 and 64 % small.micro_batch_size == 0 and small.micro_batch_size >= 8
    assert small.micro_batch_size < big.micro_batch_size
    with pytest.raises(ConfigError, match=r"train.memory_budget: nothing fits in 1.00 GiB .*the smallest setting, "
                                          r"train.micro_batch_size=1, plans .* GiB \(largest phase: "):
        fit("1GB")
    with pytest.raises(ConfigError, match="train.memory_budget: 'lots' is not a size"):
        fit("lots")


def test_checkpointing_comes_on_only_when_nothing_fits_without_it():
    """On a GPU (planned for CUDA here: the budget is explicit, no card needed)."""
    from lowalign.planner import fit_memory

    small_eval = ["eval.batch_size=4", "train.memory_budget=64GB"]  # the training pass is the largest phase

    def peak(mb, gc):
        return fit_memory(load_config("recipes/grpo_smollm2.yaml", [f"train.micro_batch_size={mb}", *small_eval,
                                                                     f"model.gradient_checkpointing={gc}"]),
                          "cuda").peak

    def gb(n):
        return f"{n / 2**30:.7f}GB"

    sizes = (1, 2, 4, 8, 16, 32, 64)
    off, on = {m: peak(m, "false") for m in sizes}, {m: peak(m, "true") for m in sizes}
    assert all(on[m] <= off[m] for m in sizes) and on[64] < off[64] and list(off.values()) == sorted(off.values())
    # a budget where only 4 rows fit without checkpointing (under min(8, batch)): checkpointing comes on and
    # the largest micro-batch that fits with it is taken
    budget = (off[4] + off[8]) / 2
    f = fit_memory(load_config("recipes/grpo_smollm2.yaml", [small_eval[0], f"train.memory_budget={gb(budget)}"]),
                   "cuda")
    want = max(m for m in sizes if on[m] <= budget)
    assert want > 4 and (f.micro_batch_size, f.gradient_checkpointing) == (want, True)
    # with room for 8 rows without it, checkpointing stays off
    roomy = gb(off[8] + 4096)
    f = fit_memory(load_config("recipes/grpo_smollm2.yaml", [small_eval[0], f"train.memory_budget={roomy}"]), "cuda")
    assert (f.micro_batch_size, f.gradient_checkpointing) == (8, False)


def test_on_a_cpu_auto_checkpointing_stays_off():
    """On a CPU auto fits the budget with the micro-batch alone (the planner's checkpointed CPU term is not
    fitted to reentrant checkpointing yet: planner.CPU_TRAIN_RSS_FACTOR)."""
    from lowalign.planner import fit_memory

    def fit(budget):
        return fit_memory(load_config("recipes/grpo_smollm2.yaml", [f"train.memory_budget={budget}"]), "cpu")

    roomy, tight = fit("2.5GB"), fit("1.9GB")
    assert tight.gradient_checkpointing is False and tight.micro_batch_size < roomy.micro_batch_size
    assert tight.peak <= 1.9 * 2**30


def test_a_preference_file_sets_the_completion_length_not_the_sampling_budget(tmp_path):
    """DPO trains on the file's chosen/rejected; ``train.max_new_tokens`` only budgets built-in on-policy
    pairs. Planning 6 completion tokens for Qwen2.5-1.5B with 512-token answers put the estimate at half the
    H200's measured peak (benchmarks/RESULTS.md)."""
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"q{i}", "chosen": "a" * 120, "rejected": "b" * (100 + i)}) + "\n")
    ov = ["model.name_or_path=builtin:tiny", "data.source=local", f"data.path={path}", "train.max_new_tokens=6"]
    p = plan(load_config(REPO / "recipes/dpo_ultrafeedback.yaml", ov), device="cuda")
    note = next(n for n in p.notes if n.startswith("prompt tokens"))
    assert "completion tokens 6 " not in note and "(measured on the data)" in note.split(";")[1], note
    longest = int(note.split("completion tokens ")[1].split()[0])
    assert longest >= 100, note


def test_rollout_prefills_each_prompt_once(monkeypatch):
    """generation.decode prefills a prompt once and keeps its keys once for the group (GroupedPrompt): 8
    prompts x 8 completions need a quarter of the prefill temporaries of 32 prompts x 2 and a quarter of the
    prompts' KV cache; the completions' KV cache is the same. A model that repeats the prompt's keys to the
    group (eager attention) plans the whole rows' cache."""
    q = str(REPO / "recipes/grpo_qwen_gsm8k.yaml")

    def rollout(ppg, g):
        p = plan(load_config(q, [f"train.prompts_per_step={ppg}", f"train.num_generations={g}"]))
        P = int(next(n for n in p.notes if n.startswith("prompt tokens")).split()[2])
        return dict((n, b) for n, b, _ in p.phases)["rollout"], p.shape, P

    (grouped, s, P), (spread, _, _) = rollout(8, 8), rollout(32, 2)
    assert s.packing == "block"
    per_prompt = P * (s.hidden * 5 + 4 * s.intermediate) * 2  # one layer's prefill temporaries, bf16
    prompt_kv = 2 * s.layers * s.kv_dim * P * 2  # one prompt's keys and values, bf16
    assert spread - grouped == 24 * (per_prompt + prompt_kv)
    from lowalign import planner

    real = planner.model_shape
    monkeypatch.setattr(planner, "model_shape", lambda cfg: dataclasses.replace(real(cfg), packing="dense"))
    repeated, _, _ = rollout(8, 8)
    assert repeated - grouped == 56 * prompt_kv  # 64 rows' copies of the prompts against 8


def test_a_large_evaluation_batch_is_named_as_the_fix():
    """Evaluation's greedy decoding is its own phase: when it is the peak, the fix is a smaller eval batch,
    which changes no result. It was missing from the candidates, so no suggestion could fit."""
    from lowalign.planner import suggestions

    cfg = load_config(REPO / "recipes/grpo_qwen_gsm8k.yaml", ["eval.batch_size=128"])
    p = plan(cfg)
    assert p.peak_phase[0] == "evaluation" and p.on_card > 2.4 * GiB
    fixes = suggestions(cfg, int(2.4 * GiB), "cuda", None)
    assert fixes and fixes[0][0] == "eval.batch_size=32" and fixes[0][1] <= 2.4 * GiB


def test_a_suggestion_that_changes_the_run_says_so():
    """Fewer or shorter completions fit too, but they train something else: the plan says which suggestions
    change what the run computes, and lists memory-only changes first."""
    from lowalign.planner import preserves_results, render, suggestions

    cfg = load_config(REPO / "recipes/grpo_qwen_gsm8k.yaml")
    budget = int(2.0 * GiB)
    fixes = suggestions(cfg, budget, "cuda", None)
    assert fixes and all(e <= budget for _, e in fixes)
    text = render(plan(cfg), budget, fixes)
    for o, _ in fixes:
        line = next(x for x in text.splitlines() if x.strip().startswith(o))
        assert ("changes what the run computes" in line) == (not preserves_results(o)), line
    assert not preserves_results("train.max_new_tokens=128 eval.batch_size=8")
    assert preserves_results("train.micro_batch_size=4 eval.batch_size=8")
    mb = load_config(REPO / "recipes/grpo_qwen_gsm8k.yaml", ["train.micro_batch_size=32"])
    fixes = suggestions(mb, int(0.8 * plan(mb).on_card), "cuda", None)
    assert fixes and all(preserves_results(o) for o, _ in fixes)


def test_gptq_calibration_is_planned_and_named_when_it_is_the_peak():
    """GPTQ holds every calibration text's hidden states and one layer's float64 Hessians (the down
    projection's is intermediate^2 x 8 B): on Qwen2.5-0.5B with 256 texts of 512 tokens that is the run's
    largest phase, and fewer calibration rows are offered as a fix (changing the calibration, so marked)."""
    from lowalign.planner import preserves_results, suggestions

    q = REPO / "recipes/grpo_qwen_gsm8k.yaml"

    def phases(rows):
        p = plan(load_config(q, ["model.quantization=nf4", f"model.gptq_rows={rows}"]))
        return {n: (b, how) for n, b, how in p.phases}, p

    assert "calibration" not in phases(0)[0]
    (small, _), (big, p) = phases(64), phases(256)
    s = p.shape
    hessians = 8 * (5 * s.hidden ** 2 + (s.attn_dim or s.hidden) ** 2 + s.intermediate ** 2)
    assert big["calibration"][0] > hessians + 2 * 8 * s.intermediate ** 2  # down_proj's Hessian + GPTQ buffers
    T = int(big["calibration"][1].split(" texts x ")[1].split()[0])
    assert big["calibration"][0] - small["calibration"][0] == 2 * (256 - 64) * T * s.hidden * 2  # bf16 states
    assert p.peak_phase[0] == "calibration"
    cfg = load_config(q, ["model.quantization=nf4", "model.gptq_rows=256"])
    fixes = suggestions(cfg, int(2.9 * GiB), "cuda", None)
    assert fixes and any("model.gptq_rows=" in o for o, _ in fixes)
    assert all(not preserves_results(o) for o, _ in fixes if "model.gptq_rows" in o)
