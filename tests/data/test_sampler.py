"""PromptSampler: epochs are permutations; a resumed sampler continues exactly."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mispo.data import PromptSampler


def test_epochs_are_permutations_and_differ():
    s = PromptSampler(10, seed=0)
    first, second = s.next_batch(10), s.next_batch(10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert s.metrics() == {"data/epoch": 2.0, "data/position": 0, "data/samples_seen": 20}
    s.next_batch(5)
    assert s.metrics()["data/epoch"] == 2.5
    assert PromptSampler(10, seed=1).next_batch(10) != first
    assert PromptSampler(4, shuffle=False).next_batch(6) == [0, 1, 2, 3, 0, 1]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**31),
       before=st.lists(st.integers(1, 25), max_size=6),
       after=st.lists(st.integers(1, 25), min_size=1, max_size=6))
def test_resume_equivalence(n, seed, before, after):
    a = PromptSampler(n, seed=seed)
    drawn = [a.next_batch(k) for k in before]
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store it as JSON
    expected = [a.next_batch(k) for k in after]
    b = PromptSampler(n, seed=12345)
    b.load_state_dict(state)
    assert [b.next_batch(k) for k in after] == expected
    # no index repeated or skipped: the whole stream is consecutive permutations of range(n)
    stream = [i for batch in drawn + expected for i in batch]
    for start in range(0, len(stream) - len(stream) % n, n):
        assert sorted(stream[start:start + n]) == list(range(n))


def test_resume_with_other_dataset_size_fails():
    import pytest

    from mispo.data import DataError

    state = PromptSampler(10).state_dict()
    with pytest.raises(DataError, match="10 rows but the dataset now has 11"):
        PromptSampler(11).load_state_dict(state)
