"""The draft model drafter (``--draft-model``) on tiny models: greedy proposals that equal the
model's own greedy run, streams that keep what the text kept, and a vocabulary check."""

import pytest

from mesh.coordinator.draft_model import DraftModel
from mesh.coordinator.drafting import NgramDrafter
from mesh.errors import InvalidInputError
from mesh.llama.native import NativeModel
from mesh.stage.runtime import RuntimeConfig
from tests.support.parity import single_greedy


def greedy(model, tokens, n):
    return single_greedy(model, tokens, n, RuntimeConfig(n_ctx=256, n_seq_max=1))


def test_proposals_follow_the_text_and_what_is_assumed_and_cut_back_what_it_dropped(
        tiny_llama):
    with NativeModel(tiny_llama, vocab_only=True) as vocab:
        n_vocab = vocab.n_vocab
    prompt = [1, 50, 60, 70, 80]
    draft = DraftModel(tiny_llama, n_vocab, n_ctx=256, slots=1)
    try:
        first = draft.drafter(prompt)
        assert isinstance(draft.drafter(prompt), NgramDrafter)  # the pool of 1 is taken
        truth = greedy(tiny_llama, prompt, 8)
        assert first.propose(4) == truth[:4]
        assert first.propose(3, assumed=truth[:2]) == truth[2:5]
        first.extend([truth[0], 7])  # the model's second token was 7, not the draft
        assert first.propose(3) == greedy(tiny_llama, [*prompt, truth[0], 7], 3)
        first.close()
        second = draft.drafter(prompt)  # its stream is free again, and empty
        assert not isinstance(second, NgramDrafter) and second.propose(2) == truth[:2]
        second.close()
    finally:
        draft.close()


def test_a_draft_model_must_share_the_targets_vocabulary(tiny_llama):
    with pytest.raises(InvalidInputError, match="vocabulary"):
        DraftModel(tiny_llama, 12345, n_ctx=256)


def test_a_drafter_outliving_its_model_proposes_nothing_and_closes_quietly(tiny_llama):
    with NativeModel(tiny_llama, vocab_only=True) as vocab:
        draft = DraftModel(tiny_llama, vocab.n_vocab, n_ctx=256, slots=1)
    drafter = draft.drafter([1, 50, 60])
    draft.close()  # the coordinator shut down while a request still held a drafter
    assert drafter.propose(3) == []
    drafter.close()
    assert isinstance(draft.drafter([1, 2]), NgramDrafter)
