import pytest
import torch

from salr_edge.algorithms.masks import is_nm_sparse, magnitude_scores, select_mask, wanda_scores


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9])
def test_matrix_granularity_hits_exact_sparsity(sparsity):
    scores = torch.rand(37, 53)
    mask = select_mask(scores, sparsity, "matrix")
    assert int((~mask).sum()) == round(sparsity * scores.numel())


def test_matrix_granularity_keeps_the_largest():
    scores = torch.arange(12.0).reshape(3, 4)
    assert select_mask(scores, 0.5, "matrix").flatten().tolist() == [False] * 6 + [True] * 6


def test_row_granularity_prunes_each_row_equally():
    mask = select_mask(torch.rand(9, 545), 0.5, "row")
    assert set(mask.sum(1).tolist()) == {545 - round(0.5 * 545)}


def test_two_four_keeps_two_of_every_four_with_odd_width():
    scores = torch.rand(6, 545)
    mask = select_mask(scores, 0.5, "2:4")
    assert is_nm_sparse(mask, 2, 4)
    full = mask[:, :544].reshape(6, 136, 4).sum(-1)
    assert bool((full == 2).all())
    assert mask[:, 544].all()  # a trailing group of 1 keeps min(2, 1) = 1


def test_two_four_keeps_top_two_in_a_group():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert select_mask(scores, 0.5, "2:4").tolist() == [[False, True, False, True]]


def test_wanda_scales_by_input_norms():
    w = torch.ones(2, 3)
    scores = wanda_scores(w, torch.tensor([1.0, 10.0, 0.1]))
    assert select_mask(scores, 1 / 3, "row").tolist() == [[True, True, False]] * 2


def test_magnitude_scores_are_absolute_values():
    assert magnitude_scores(torch.tensor([[-2.0, 1.0]])).tolist() == [[2.0, 1.0]]


def test_out_of_range_sparsity_is_rejected():
    with pytest.raises(ValueError, match="sparsity"):
        select_mask(torch.rand(2, 2), 1.0)
