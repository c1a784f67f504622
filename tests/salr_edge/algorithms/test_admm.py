import math

import pytest
import torch

from salr_edge.algorithms import admm

# fp32 tolerances: the operators are a few fp32 ops (SVD, one GEMM) on O(1) entries, so errors stay at a
# few ulps times the matrix size; 1e-5 absolute leaves margin without hiding a wrong formula.
ATOL, RTOL = 1e-5, 1e-5


def _orthonormal(n: int, m: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, m, generator=torch.Generator().manual_seed(seed)))
    return q


def test_soft_threshold_is_the_elementwise_closed_form():
    x = torch.randn(7, 5)  # odd shape
    tau = 0.3
    expected = torch.tensor([[math.copysign(max(abs(v) - tau, 0.0), v) for v in row] for row in x.tolist()])
    torch.testing.assert_close(admm.soft_threshold(x, tau), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(admm.soft_threshold(x, 0.0), x)
    with pytest.raises(ValueError, match="threshold"):
        admm.soft_threshold(x, -1.0)


def test_svt_of_a_diagonal_matrix_shrinks_its_diagonal():
    m = torch.zeros(5, 4)
    m[0, 0], m[1, 1], m[2, 2], m[3, 3] = 5.0, 3.0, 1.0, 0.5
    low = admm.singular_value_threshold(m, 1.0)
    expected = torch.zeros(5, 4)
    expected[0, 0], expected[1, 1] = 4.0, 2.0
    assert low.rank == 2  # σ = 1 and 0.5 fall to 0 and are dropped
    torch.testing.assert_close(low.s, torch.tensor([4.0, 2.0]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(low.dense(), expected, atol=ATOL, rtol=RTOL)


def test_svt_matches_the_closed_form_on_a_rotated_spectrum():
    u, v = _orthonormal(9, 6, 1), _orthonormal(7, 6, 2)  # X = U diag(s) Vᵀ, 9x7 (odd)
    s = torch.tensor([6.0, 4.0, 2.5, 1.0, 0.4, 0.1])
    x = u @ torch.diag(s) @ v.T
    tau = 1.5
    expected = u @ torch.diag(torch.clamp(s - tau, min=0)) @ v.T
    torch.testing.assert_close(admm.singular_value_threshold(x, tau).dense(), expected, atol=ATOL, rtol=RTOL)


def test_randomized_svt_is_exact_on_a_low_rank_matrix_and_deterministic():
    u, v = _orthonormal(40, 5, 3), _orthonormal(33, 5, 4)
    x = u @ torch.diag(torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0])) @ v.T
    full = admm.singular_value_threshold(x, 0.5)
    rand = admm.singular_value_threshold(x, 0.5, "randomized", max_rank=12, niter=2,
                                         generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(rand.dense(), full.dense(), atol=1e-4, rtol=1e-4)
    again = admm.singular_value_threshold(x, 0.5, "randomized", max_rank=12, niter=2,
                                          generator=torch.Generator().manual_seed(7))
    assert torch.equal(rand.dense(), again.dense())


def test_effective_rank_counts_the_energy():
    s = torch.tensor([math.sqrt(0.9), math.sqrt(0.0995), math.sqrt(0.0005)])  # energies 0.9, 0.0995, 0.0005
    assert admm.effective_rank(s, 0.999) == 2
    assert admm.effective_rank(s, 0.85) == 1
    assert admm.effective_rank(s, 1.0) == 3
    assert admm.effective_rank(torch.zeros(4), 0.999) == 0
    assert admm.effective_rank(torch.tensor([2.0, 0.0, 0.0]), 1.0) == 1
    with pytest.raises(ValueError, match="energy"):
        admm.effective_rank(s, 0.0)


def test_penalty_gradient_is_rho_times_the_gap_plus_the_dual():
    x = torch.randn(6, 11, requires_grad=True)
    low, sparse, dual = torch.randn(6, 11), torch.randn(6, 11), torch.randn(6, 11)
    rho = 0.37
    admm.penalty(x, low, sparse, dual, rho).backward()
    torch.testing.assert_close(x.grad, rho * (x.detach() - low - sparse) + dual, atol=ATOL, rtol=RTOL)
    target = admm.penalty_target(low, sparse, dual, rho)  # the cached form (ρ/2)‖X − T‖²
    torch.testing.assert_close(0.5 * rho * (x.detach() - target).pow(2).sum(),
                               admm.penalty(x.detach(), low, sparse, dual, rho), atol=1e-4, rtol=1e-5)


def test_one_admm_round_follows_the_update_formulas():
    x, sparse, dual = torch.randn(13, 9), 0.1 * torch.randn(13, 9), 0.05 * torch.randn(13, 9)
    alpha, beta, rho = 0.4, 0.02, 0.5
    result = admm.admm_round(x, sparse, dual, alpha, beta, rho)
    low = admm.singular_value_threshold(x - sparse + dual / rho, alpha / rho).dense()
    new_sparse = admm.soft_threshold(x - low + dual / rho, beta / rho)
    torch.testing.assert_close(result.L.dense(), low, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(result.S, new_sparse, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(result.Y, dual + rho * (x - low - new_sparse), atol=ATOL, rtol=RTOL)
    assert result.density == pytest.approx(float((new_sparse != 0).float().mean()))
    assert result.residual == pytest.approx(float((x - low - new_sparse).norm()), rel=1e-5)
    assert result.rank_ratio == result.effective_rank / 9
    kept = admm.admm_round(x, sparse, dual, alpha, beta, rho, update_dual=False)
    assert torch.equal(kept.Y, dual)


def test_hard_threshold_keeps_exactly_the_largest_entries_unshrunk():
    x = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    torch.testing.assert_close(admm.hard_threshold(x, 0.5), torch.tensor([[0.0, -3.0, 0.0], [2.0, 0.0, 1.0]]))
    assert torch.equal(admm.hard_threshold(x, 1.0), x)
    assert not admm.hard_threshold(x, 0.0).any()
    with pytest.raises(ValueError, match="keep must be a fraction"):
        admm.hard_threshold(x, 1.5)


def test_a_hard_round_keeps_the_target_density_of_the_residual_and_ignores_beta():
    x, sparse, dual = torch.randn(13, 9), 0.1 * torch.randn(13, 9), 0.05 * torch.randn(13, 9)
    alpha, rho = 0.4, 0.5
    result = admm.admm_round(x, sparse, dual, alpha, 123.0, rho, keep=0.3)
    low = admm.singular_value_threshold(x - sparse + dual / rho, alpha / rho).dense()
    torch.testing.assert_close(result.S, admm.hard_threshold(x - low + dual / rho, 0.3), atol=ATOL, rtol=RTOL)
    assert result.density == pytest.approx(round(0.3 * 117) / 117)


def test_controller_raises_above_target_lowers_below_and_damps_one_sided():
    assert admm.controller_step(1.0, 0.5, 0.3, 2.0) == pytest.approx(math.exp(0.4))
    assert admm.controller_step(1.0, 0.1, 0.3, 2.0) == pytest.approx(math.exp(-0.4))
    assert admm.controller_step(1.0, 0.3, 0.3, 2.0) == 1.0
    # damping acts only while the rate rises
    assert admm.controller_step(1.0, 0.5, 0.3, 2.0, previous_rate=0.4, damping=3.0) == pytest.approx(math.exp(0.7))
    assert admm.controller_step(1.0, 0.5, 0.3, 2.0, previous_rate=0.6, damping=3.0) == pytest.approx(math.exp(0.4))
    with pytest.raises(ValueError, match="positive"):
        admm.controller_step(0.0, 0.5, 0.3, 2.0)


def test_initial_thresholds_hit_a_rank_and_a_density():
    x = torch.randn(30, 21)
    s = torch.linalg.svdvals(x)
    assert int((torch.clamp(s - admm.threshold_for_rank(s, 7), min=0) > 0).sum()) == 7
    tau = admm.threshold_for_density(x, 0.25)
    assert float((admm.soft_threshold(x, tau) != 0).float().mean()) == pytest.approx(0.25, abs=1 / x.numel())
