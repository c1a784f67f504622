import pytest
import torch

from salr_edge.algorithms.masks import magnitude_scores, select_mask
from salr_edge.algorithms.svd import truncated_svd


def _residual_error_ratio(residual, rank, method="full"):
    a, b = truncated_svd(residual, rank, method)
    return float((residual - b @ a).pow(2).sum() / residual.pow(2).sum())


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_svd_residual_beats_the_energy_bound_on_random_pruning_residuals(rank):
    w = torch.randn(96, 70)
    mask = select_mask(magnitude_scores(w), 0.5)
    residual = w * ~mask
    assert _residual_error_ratio(residual, rank) <= 1 - rank / min(w.shape) + 1e-6


def test_randomized_svd_is_close_to_full():
    residual = torch.randn(200, 120) @ torch.diag(torch.linspace(3, 0.01, 120))
    full = _residual_error_ratio(residual, 16, "full")
    rand = _residual_error_ratio(residual, 16, "randomized")
    assert rand <= full * 1.05 + 1e-6


def test_factors_have_balanced_scale():
    a, b = truncated_svd(torch.randn(40, 30), 5)
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-4, atol=1e-4)


def test_rank_above_min_dimension_is_rejected():
    with pytest.raises(ValueError, match="rank must be in"):
        truncated_svd(torch.randn(10, 4), 5)
