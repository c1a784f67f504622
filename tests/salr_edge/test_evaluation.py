import math

import torch
from torch import nn

from salr_edge.evaluation import extract_answer, perplexity


class _Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    tokens = torch.randint(0, 50, (1000,))
    assert math.isclose(perplexity(_Uniform(50), tokens, context=64, show_progress=False), 50.0, rel_tol=1e-5)


def test_perplexity_of_a_real_model_is_finite(tiny_llama):
    ppl = perplexity(tiny_llama, torch.randint(0, 128, (300,)), context=64, max_windows=2, show_progress=False)
    assert math.isfinite(ppl) and ppl > 1


def test_extract_answer_prefers_the_number_after_hashes():
    assert extract_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert extract_answer("The answer is 42.") == "42"
    assert extract_answer("no number") is None
