"""Ranked lists for the listwise objectives (PRO, RRHF), and the objective they plug into the shared preference
loop (``pairs.train_preference``): each batch is whole lists, every response's per-token averaged log-prob
under the policy, scored responses ranked within their list (``lowalign.losses.listwise``).

A list is ``{"prompt", "completions": [...], "scores": [...]}`` (plus ``answer`` on the task). Built once and
stored as ``lists.json`` in the run directory, so a resumed run reads the same lists:

* the built-in task: per training prompt, ``preference.candidate_completions`` (the right answer, a near miss,
  a rambling, a cut-short and an empty answer, and the starting policy's own samples), scored by the
  recipe's rewards (with the run's answer checker); held-out lists from held-out prompts, without samples;
* a rating file (``data.path``): its rows grouped by prompt, each response scored by the weighted sum of the
  ``train.attributes`` columns.

Lists whose responses all score alike rank nothing and are dropped.
"""

from __future__ import annotations

import json

import torch

from lowalign.algorithms.common import reward_sources
from lowalign.algorithms.pairs import PreferenceObjective, completion_logps, heldout_mean
from lowalign.losses.listwise import list_ranking_accuracy
from lowalign.preference import PreferenceData, candidate_completions


def check(cfg) -> None:
    """A rating file needs its score columns named; weights, when given, one per column."""
    from lowalign.config import ConfigError
    from lowalign.data import is_builtin

    tc = cfg.train
    if not is_builtin(cfg.data) and not tc.attributes:
        raise ConfigError("train.attributes: name the rating file's numeric score columns (a response's score is "
                          "their sum weighted by train.attribute_weights), e.g. train.attributes=[correctness]")
    if tc.attribute_weights and len(tc.attribute_weights) != len(tc.attributes):
        raise ConfigError(f"train.attribute_weights: {len(tc.attribute_weights)} weights for "
                          f"{len(tc.attributes)} attributes {tc.attributes}")


def _ranked(lists: list[dict]) -> list[dict]:
    return [lst for lst in lists if len(set(lst["scores"])) > 1]


def _task_lists(ctx, tc, rows: list[dict], seed: int, samples: int, role: str) -> list[dict]:
    from lowalign.rewards import row_columns

    comps = candidate_completions(rows, seed, ctx.bundle if samples else None, max(samples, 1), tc.max_new_tokens,
                                  role)
    if ctx.cfg.rewards:  # the run's sources: learned reward adapters loaded, the run's checker and answer view
        rewards = reward_sources(ctx)
    else:  # no rewards in the recipe: the task's checker, 1 for a right answer, 0 otherwise
        def rewards(_p, texts, cols):
            from lowalign.rewards import RewardBatch

            t = torch.tensor([float(ctx.data.checker(c, a)) for c, a in zip(texts, cols["answer"])])
            return RewardBatch(t, {"correctness": t})
    out = []
    for r, cs in zip(rows, comps):
        scores = rewards([r["prompt"]] * len(cs), cs, row_columns([r], len(cs))).total
        out.append({"prompt": r["prompt"], "completions": cs, "scores": [round(float(x), 6) for x in scores],
                    "answer": r["answer"]})
    return out


def _file_lists(rated: list[dict], weights: list[float]) -> list[dict]:
    by_prompt: dict[str, dict] = {}
    for row in rated:
        lst = by_prompt.setdefault(row["prompt"], {"prompt": row["prompt"], "completions": [], "scores": []})
        lst["completions"].append(row["completion"])
        lst["scores"].append(round(sum(w * v for w, v in zip(weights, row["scores"])), 6))
    return list(by_prompt.values())


def run_lists(ctx, tc, role: str = "reference") -> PreferenceData:
    """The run's ranked lists (train, held-out), built once and kept in ``lists.json``."""
    f = ctx.run_dir.path / "lists.json"
    if f.exists():
        blob = json.loads(f.read_text())
        return PreferenceData(blob["train"], blob["eval"])
    cfg = ctx.cfg
    if ctx.data.pairs is not None:  # a rating file
        w = tc.attribute_weights or [1.0] * len(tc.attributes)
        data = PreferenceData(_file_lists(ctx.data.pairs.train, w), _file_lists(ctx.data.pairs.eval, w))
    else:
        from lowalign.data import render_rows

        task, render = ctx.data.task, ctx.data.render
        ctx.console.print(f"building {tc.num_lists} ranked lists ({tc.onpolicy_samples} own samples each) ...")
        train = _task_lists(ctx, tc, render_rows(task.train_rows(tc.num_lists, seed=cfg.seed), render), cfg.seed,
                            tc.onpolicy_samples, role)
        held = _task_lists(ctx, tc, render_rows(task.eval_rows(tc.eval_lists), render), cfg.seed + 7, 0, role)
        data = PreferenceData(train, held)
    data = PreferenceData(_ranked(data.train), _ranked(data.eval))
    if not data.train:
        from lowalign.data import DataError

        raise DataError("no ranked lists to train on: every prompt's responses score alike")
    ctx.run_dir.write_text(f.name, json.dumps({"train": data.train, "eval": data.eval}))
    sizes = [len(lst["completions"]) for lst in data.train]
    ctx.console.print(f"ranked lists: {len(data.train)} train ({sum(sizes) / len(sizes):.1f} responses each), "
                      f"{len(data.eval)} held-out")
    return data


def list_tensors(bundle, lists: list[dict]):
    """(avg_logps, scores, mask) as (L, n) padded to the longest list, and the best response's avg log-prob
    (L,): every response of the batch in one teacher-forcing pass, in the current role."""
    prompts = [lst["prompt"] for lst in lists for _ in lst["completions"]]
    comps = [c for lst in lists for c in lst["completions"]]
    lp, lens = completion_logps(bundle, prompts, comps)
    avg = lp / lens.clamp(min=1)
    L, n = len(lists), max(len(lst["completions"]) for lst in lists)
    rows = torch.tensor([i for i, lst in enumerate(lists) for _ in lst["completions"]])
    cols = torch.tensor([j for lst in lists for j in range(len(lst["completions"]))])
    p = avg.new_zeros(L, n).index_put((rows, cols), avg)
    s = torch.zeros(L, n).index_put((rows, cols), torch.tensor([x for lst in lists for x in lst["scores"]]))
    m = torch.zeros(L, n).index_put((rows, cols), torch.ones(len(comps)))
    best = torch.tensor([max(range(len(lst["scores"])), key=lambda j, lst=lst: (lst["scores"][j], -j))
                         for lst in lists])
    s, m = s.to(p.device), m.to(p.device)
    return p, s, m, p[torch.arange(L, device=p.device), best.to(p.device)]


def listwise_objective(ctx, loss_fn, **kw) -> PreferenceObjective:
    """``loss_fn(avg_logps, scores, mask, best_avg_logps, **kw)`` on each batch of lists; held-out: the share of
    ranked pairs of each held-out list whose averaged log-probs order as their scores do, averaged over lists
    (``losses.listwise.list_ranking_accuracy``)."""
    bundle = ctx.bundle

    def loss(lists, _idx):
        return loss_fn(*list_tensors(bundle, lists), **kw)

    def heldout(lists):
        def acc(chunk, _start):
            return list_ranking_accuracy(*list_tensors(bundle, chunk)[:3])

        return {"ranking_accuracy": heldout_mean(bundle, lists, acc, batch_size=16)}

    return PreferenceObjective(loss, heldout)
