"""API keys on the router (`--api-key-file`, spec.router.auth) and two request defects answered with
a 400 that names the problem: a body nested too deeply, a chat message with an unknown role."""

import os
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from distserve_worker.model_source import ModelSpec
from distserve_worker.router import auth
from distserve_worker.router.app import build_app
from distserve_worker.router.auth import ApiKeys
from distserve_worker.router.openai import BadRequest, parse_request
from distserve_worker.settings import RouterSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support
from operator_support.fake_workers import FakeDecode, FakePrefill, Vocab, router_for, serving

KEY, OTHER = "sk-test-0123456789", "sk-other-abcdef"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def key_file(tmp_path, *lines, mtime=1_000_000_000):
    path = tmp_path / "keys"
    path.write_text("\n".join(lines) + "\n")
    os.utime(path, ns=(mtime, mtime))
    return path


def test_a_key_is_needed_and_must_be_one_in_the_file(tmp_path):
    keys = ApiKeys(key_file(tmp_path, KEY))
    assert keys.allows(f"Bearer {KEY}")
    assert keys.allows(f"bearer  {KEY} ")  # the scheme is case-insensitive, spaces around the key ignored
    assert not keys.allows(None)
    assert not keys.allows("")
    assert not keys.allows("Bearer ")
    assert not keys.allows(f"Bearer {OTHER}")
    assert not keys.allows(f"Bearer {KEY[:-1]}")  # a prefix is not the key
    assert not keys.allows(f"Basic {KEY}")
    assert not keys.allows(KEY)


def test_several_keys_one_a_line_blank_lines_ignored(tmp_path):
    keys = ApiKeys(key_file(tmp_path, "", f"  {KEY}  ", "", OTHER, "   "))
    assert keys.count == 2
    assert keys.allows(f"Bearer {KEY}") and keys.allows(f"Bearer {OTHER}")
    assert not keys.allows("Bearer  ")


def test_a_rotated_file_takes_effect_once_its_mtime_changes_checked_once_a_second(tmp_path):
    clock = Clock()
    path = key_file(tmp_path, KEY)
    keys = ApiKeys(path, clock=clock)
    key_file(tmp_path, OTHER, mtime=2_000_000_000)  # the kubelet swaps the Secret's file in place
    assert keys.allows(f"Bearer {KEY}")  # not looked at again within the second
    clock.now += 1.0
    assert keys.allows(f"Bearer {OTHER}") and not keys.allows(f"Bearer {KEY}")
    # A file that cannot be read (mid-update) keeps the keys read last.
    path.unlink()
    clock.now += 1.0
    assert keys.allows(f"Bearer {OTHER}")


def test_a_secret_volume_update_is_seen_through_the_kubelets_symlink_swap(tmp_path):
    """The kubelet writes a new timestamped directory and swaps the `..data` symlink to it; the
    mounted `keys` is a symlink through `..data`."""

    def version(name, key):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keys").write_text(key + "\n")
        (tmp_path / "..data_tmp").symlink_to(name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    version("ts1", KEY)
    (tmp_path / "keys").symlink_to("..data/keys")
    clock = Clock()
    keys = ApiKeys(tmp_path / "keys", clock=clock)
    version("ts2", OTHER)
    clock.now += 1.0
    assert keys.allows(f"Bearer {OTHER}") and not keys.allows(f"Bearer {KEY}")


def test_every_key_is_compared_in_constant_time(tmp_path, monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ApiKeys(key_file(tmp_path, KEY, OTHER))
    assert keys.allows(f"Bearer {KEY}")
    assert calls == [(KEY.encode(), KEY.encode()), (KEY.encode(), OTHER.encode())]  # no early exit


def test_a_missing_key_file_stops_the_router_at_start(tmp_path):
    with pytest.raises(OSError):
        ApiKeys(tmp_path / "absent")


def test_a_chat_message_with_an_unknown_role_is_refused_naming_the_allowed_ones():
    with pytest.raises(BadRequest) as err:
        parse_request({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, True, "m")
    assert err.value.param == "messages"
    assert "'wizard'" in str(err.value) and "system, user, assistant" in str(err.value)
    for role in ("system", "user", "assistant"):
        parse_request({"model": "m", "messages": [{"role": role, "content": "hi"}]}, True, "m")


# ---------------------------------------------------------------------------------- the router app


@pytest.fixture
async def client(tmp_path):
    """The router's app with a key file, in front of fake prefill and decode instances."""
    async with serving(FakePrefill(), FakeDecode()) as address:
        settings = RouterSettings(
            model=ModelSpec(name="m"),
            prefill=(address,),
            decode=(address,),
            api_key_file=str(key_file(tmp_path, KEY)),
        )
        async with router_for(settings, Vocab()) as router, TestClient(TestServer(build_app(router))) as c:
            yield c


COMPLETION = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 1}


async def test_the_api_answers_401_without_the_key_and_200_with_it(client, capsys):
    for headers, message in (
        ({}, "didn't provide an API key"),
        ({"Authorization": "Bearer nope"}, "Incorrect"),
    ):
        response = await client.post("/v1/completions", json=COMPLETION, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
        assert message in error["message"]
    assert (await client.get("/v1/models")).status == 401
    assert (await client.get("/v1/distserve/instances")).status == 401

    ok = {"Authorization": f"Bearer {KEY}"}
    response = await client.post("/v1/completions", json=COMPLETION, headers=ok)
    assert response.status == 200, await response.text()
    assert (await response.json())["choices"][0]["text"] == "x"
    assert (await client.get("/v1/models", headers=ok)).status == 200

    # Probes and scrapes stay open, and count the refusals.
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    metrics = await client.get("/metrics")
    assert metrics.status == 200
    assert 'status="unauthorized"' in await metrics.text()
    assert KEY not in capsys.readouterr().out  # never logged


@pytest.mark.parametrize("body", ["[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000])
async def test_a_body_nested_too_deeply_is_a_400_saying_so(client, body):
    response = await client.post(
        "/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert "nests too deeply" in (await response.json())["error"]["message"]


async def test_an_unknown_role_is_a_400_naming_it(client):
    body = {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}
    response = await client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert "'wizard'" in error["message"] and error["param"] == "messages"
