import torch

from lowalign.es import (
    ESState,
    centered_ranks,
    cma_update,
    es_gradient,
    es_update,
    noise,
    population,
    recombination_weights,
)


def test_centered_ranks_worked_example():
    torch.testing.assert_close(centered_ranks(torch.tensor([3.0, 1.0, 2.0])), torch.tensor([0.5, -0.5, 0.0]))
    torch.testing.assert_close(centered_ranks(torch.tensor([1.0, 1.0, 0.0])), torch.tensor([0.25, 0.25, -0.5]))


def test_noise_is_regenerated_from_seed():
    assert torch.equal(noise(5, 3), noise(5, 3)) and not torch.equal(noise(5, 3), noise(5, 4))


def test_antithetic_population_and_gradient_direction():
    st = ESState(torch.zeros(4), torch.zeros(4), torch.zeros(4))
    members = dict(population(st, 4, 0.1, seed=0, generation=0))
    torch.testing.assert_close(members[0], -members[1])  # antithetic pair
    # fitness = <theta, target>: the ES gradient points along target
    target = torch.tensor([1.0, -2.0, 0.5, 0.0])
    st2 = ESState(torch.zeros(4), torch.zeros(4), torch.zeros(4))
    pop = dict(population(st2, 400, 0.1, seed=1, generation=0))
    f = torch.stack([pop[i] @ target for i in range(400)])
    g = es_gradient(f, 4, 0.1, seed=1, generation=0)
    assert torch.nn.functional.cosine_similarity(g, target, dim=0) > 0.9


def _sphere_run(method, gens=60):
    opt = torch.tensor([0.5, -0.3, 0.2])
    st = ESState(torch.zeros(3), torch.zeros(3), torch.ones(3) if method == "cma" else torch.zeros(3), sigma=0.1)
    for g in range(gens):
        pop = dict(population(st, 16, 0.05, seed=0, generation=g, method=method))
        f = torch.stack([-((pop[i] - opt) ** 2).sum() for i in range(16)])
        if method == "cma":
            cma_update(st, f, seed=0, generation=g)
        else:
            es_update(st, f, sigma=0.05, lr=0.03, seed=0, generation=g)
    return float(((st.theta - opt) ** 2).sum())


def test_es_and_cma_minimize_a_sphere():
    start = 0.5**2 + 0.3**2 + 0.2**2
    assert _sphere_run("es") < 0.1 * start
    assert _sphere_run("cma") < 0.1 * start


def test_state_roundtrip_and_determinism():
    st = ESState(torch.ones(3), torch.zeros(3), torch.zeros(3))
    es_update(st, torch.tensor([1.0, 0.0, 2.0, 3.0]), sigma=0.1, lr=0.1, seed=0, generation=0)
    st2 = ESState.from_state_dict(st.state_dict())
    for s in (st, st2):
        es_update(s, torch.tensor([0.0, 1.0, 2.0, 1.0]), sigma=0.1, lr=0.1, seed=0, generation=1)
    assert torch.equal(st.theta, st2.theta) and st.step == st2.step == 2


def test_recombination_weights_share_ties():
    w = torch.tensor([0.7, 0.3])
    torch.testing.assert_close(recombination_weights(torch.tensor([1.0, 3.0, 3.0, 0.0]), w),
                               torch.tensor([0.0, 0.5, 0.5, 0.0]))
    torch.testing.assert_close(recombination_weights(torch.tensor([1.0, 3.0, 2.0, 0.0]), w),
                               torch.tensor([0.0, 0.7, 0.3, 0.0]))  # no ties: the ranks' own weights
    tie_at_cut = recombination_weights(torch.tensor([2.0, 1.0, 1.0, 0.0]), w)  # 2nd and 3rd tie across the cut
    torch.testing.assert_close(tie_at_cut, torch.tensor([0.7, 0.15, 0.15, 0.0]))
    assert abs(float(tie_at_cut.sum()) - 1.0) < 1e-6


def test_cma_does_not_move_on_a_population_that_ties():
    """Every member equally fit carries no information: antithetic pairs get equal weights and cancel, so the
    mean stays put (member order used to pick the +eps half)."""
    st = ESState(torch.zeros(5), torch.zeros(5), torch.ones(5), sigma=0.1)
    norm = cma_update(st, torch.full((8,), 0.5), seed=0, generation=0)
    assert norm == 0.0 and torch.equal(st.theta, torch.zeros(5))
    st2 = ESState(torch.zeros(5), torch.zeros(5), torch.ones(5), sigma=0.1)
    assert cma_update(st2, torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), seed=0, generation=0) > 0  # one differs
