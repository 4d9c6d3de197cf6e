"""Router pieces without I/O: OpenAI request validation and instance picking."""

import pytest

from distserve_worker.router.openai import BadRequest, parse_request
from distserve_worker.router.picker import Instance, pick_decode, pick_prefill

MODEL = "m"


def test_valid_completion_request():
    req = parse_request(
        {"model": MODEL, "prompt": "hi", "max_tokens": 5, "stop": "x", "seed": 3}, False, MODEL
    )
    assert (req.prompt, req.max_tokens, req.stop, req.seed, req.stream) == ("hi", 5, ["x"], 3, False)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi"}, "model"),
        ({"model": "other", "prompt": "hi"}, "model"),
        ({"model": MODEL, "prompt": ""}, "prompt"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": 3}, "temperature"),
        ({"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": MODEL, "prompt": "hi", "n": 2}, "n"),
        ({"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream"),
        ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_bad_completion_requests_name_the_parameter(body, param):
    with pytest.raises(BadRequest) as err:
        parse_request(body, False, MODEL)
    assert err.value.param == param and str(err.value)


def test_chat_needs_messages_with_role_and_content():
    with pytest.raises(BadRequest):
        parse_request({"model": MODEL, "messages": [{"role": "user"}]}, True, MODEL)
    req = parse_request({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, True, MODEL)
    assert req.messages == [{"role": "user", "content": "x"}]


def test_prefill_goes_to_the_least_loaded_healthy_instance():
    a = Instance("a", healthy=True, queued=3)
    b = Instance("b", healthy=True, inflight=1)
    c = Instance("c", healthy=False)
    assert pick_prefill([a, b, c]) is b
    assert pick_prefill([c]) is None


def test_decode_prefers_room_then_load():
    full = Instance("a", healthy=True, running=4, free_slots=0, resident=4)
    roomy = Instance("b", healthy=True, running=6, free_slots=2, resident=6)
    assert pick_decode([full, roomy]) is roomy
    roomy.inflight = 2
    # Nobody has a free slot, neither is saturated: the least loaded holds it until a slot frees.
    assert pick_decode([full, roomy]) is full


async def test_dns_discovery_lists_every_address_of_a_name():
    from distserve_worker.router.discovery import DnsDiscovery

    assert await DnsDiscovery("localhost", 50051).resolve() in (
        ["127.0.0.1:50051"],
        ["127.0.0.1:50051", "[::1]:50051"],
    )
    assert await DnsDiscovery("no-such-service.invalid", 50051).resolve() == []


def test_instances_that_are_not_ready_are_never_picked():
    loading = Instance("a", healthy=True, ready=False)  # answers Status, but a rank is down
    serving = Instance("b", healthy=True, queued=9, running=9, free_slots=1, resident=9)
    assert pick_prefill([loading, serving]) is serving
    assert pick_decode([loading, serving]) is serving
    assert pick_prefill([loading]) is None and pick_decode([loading]) is None
    assert not Instance("c", healthy=False, ready=True).routable


def test_decode_in_the_prefills_own_pod_comes_first_while_it_has_room():
    """SharedPod: prefill and decode of instance k share pod k's IP; the pull then stays inside it."""
    beside = Instance("10.0.0.7:50052", healthy=True, free_slots=4, running=3)
    elsewhere = Instance("10.0.0.8:50052", healthy=True, free_slots=4, running=0)
    assert pick_decode([elsewhere, beside], near="10.0.0.7:50051") is beside
    assert pick_decode([elsewhere, beside]) is elsewhere  # no hint: the least loaded
    beside.free_slots = 0  # full: the pod's own decode is not worth a queue
    assert pick_decode([elsewhere, beside], near="10.0.0.7:50051") is elsewhere
