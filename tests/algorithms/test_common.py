"""The shared optimizer: flat gradient and moment buffers, checked against torch's own AdamW."""

from __future__ import annotations

import copy

import torch

from lowalign.algorithms.common import AdamW, optimizer_step
from lowalign.distributed import Dist


def _model(seed: int = 0) -> torch.nn.ModuleDict:
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({"a": torch.nn.Linear(5, 3), "b": torch.nn.Linear(3, 2, bias=False),
                                "unused": torch.nn.Linear(2, 2)})


def _loss(m, x: torch.Tensor, step: int) -> torch.Tensor:
    y = m["b"](torch.tanh(m["a"](x)))
    if step % 3 == 2:  # "unused" takes part in some steps only: its moments must decay only then
        y = y + m["unused"](y).sum()
    return (y ** 2).mean()


def _train(opt_cls, steps: int, micro: int = 2, state=None):
    m = _model()
    params = list(m.parameters())
    opt = opt_cls(params, lr=0.05, weight_decay=0.01, betas=(0.9, 0.99))
    if state is not None:
        opt.load_state_dict(copy.deepcopy(state))
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for _ in range(micro):  # gradients accumulate over micro-batches
            _loss(m, torch.randn(4, 5, generator=g), step).backward()
        if isinstance(opt, AdamW):
            optimizer_step(Dist(), params, opt, None, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return m, opt


def test_flat_adamw_matches_torch_bitwise_with_a_sometimes_unused_parameter():
    ours, opt = _train(AdamW, 7)
    ref, ref_opt = _train(torch.optim.AdamW, 7)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    ours_state, ref_state = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    for i, st in ref_state.items():
        for k, v in st.items():
            assert torch.equal(ours_state[i][k], v), (i, k)


def test_gradients_and_moments_stay_views_of_one_buffer():
    m, opt = _train(AdamW, 4)
    params = list(m.parameters())
    flat = opt.flat_grads.flats[0]
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    assert len(opt.flat_grads.flats) == 1 and flat.numel() == sum(p.numel() for p in params)
    for p in params:  # cleared, not freed: the same memory every step
        assert p.grad is not None and start <= p.grad.data_ptr() < end and not p.grad.any()
    for k in AdamW.MOMENTS:
        ptrs = {opt.state[p][k].untyped_storage().data_ptr() for p in params}
        assert len(ptrs) == 1, k  # one storage per moment


def test_a_loaded_state_goes_into_the_buffers_and_training_continues_identically():
    _, ref_opt = _train(torch.optim.AdamW, 3)
    state = ref_opt.state_dict()
    m, opt = _train(AdamW, 2, state=state)
    m_ref, _ = _train(torch.optim.AdamW, 2, state=state)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        assert torch.equal(p, q)
    for k in AdamW.MOMENTS:
        assert len({opt.state[p][k].untyped_storage().data_ptr() for p in m.parameters()}) == 1
