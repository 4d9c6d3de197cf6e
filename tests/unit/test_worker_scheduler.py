"""Decode admission and prefill batching, as data structures."""

from distserve_worker.engine.scheduler import DecodeScheduler, PrefillBatcher
from distserve_worker.engine.sequence import Finish, SeqStatus, Sequence


def seq(rid: str, prompt: int = 10, max_tokens: int = 10) -> Sequence:
    return Sequence(request_id=rid, prompt_tokens=prompt, first_token=1, max_tokens=max_tokens)


def test_admits_fifo_up_to_slots_and_kv_tokens():
    s = DecodeScheduler(max_running=2, max_kv_tokens=100)
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    assert s.admit() == [a, b]
    assert c.status is SeqStatus.WAITING and s.free_slots == 0
    s.finish(a, Finish.STOP)
    assert s.admit() == [c]


def test_big_head_is_not_overtaken_and_waits_for_room():
    s = DecodeScheduler(max_running=8, max_kv_tokens=100)
    small, big, small2 = seq("s", 30, 30), seq("b", 40, 40), seq("s2", 5, 5)
    for x in (small, big, small2):
        s.add(x)
    assert s.admit() == [small]
    s.finish(small, Finish.STOP)
    assert s.admit() == [big, small2]


def test_only_pulled_sequences_run_and_finished_ones_leave():
    s = DecodeScheduler(max_running=4, max_kv_tokens=1000)
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    s.admit()
    s.mark_ready(b)
    assert s.running() == [b]
    s.mark_ready(a)
    assert s.running() == [a, b]
    s.finish(a, Finish.ABORTED)
    assert s.running() == [b] and s.counts() == (0, 1)


def test_cached_tokens_count_prompt_and_all_but_the_last_output():
    x = seq("x", prompt=7)
    assert x.cached_tokens == 7
    x.output.append(5)
    assert x.cached_tokens == 8


def test_prefill_batches_up_to_the_token_budget_counting_padding():
    b = PrefillBatcher(token_budget=100)
    for rid, n in [("a", 40), ("b", 30), ("c", 20), ("d", 60), ("e", 10), ("f", 500)]:
        b.add(rid, n)
    assert b.next_batch() == ["a", "b"]  # padded to 40: 80 tokens; a third row would make 120
    assert b.next_batch() == ["c"]  # 20 + 60 real tokens fit, but padded they are 2 x 60
    assert b.next_batch() == ["d"]
    assert b.next_batch() == ["e"]
    assert b.next_batch() == ["f"]  # longer than the budget: runs alone
    assert b.next_batch() == []
