"""Bounded inputs and bounded errors: the gateway's request limits (gateway/limits.py), the
shared helpers (services/runtime/limits.py) and the backends' own id-length limits."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.limits import RequestLimits, check_recommend
from gateway.service import GatewaySettings
from services.features.layout import item_key, user_key
from services.features.service import FeaturesSettings
from services.genproto.infermesh.gateway.v1 import gateway_pb2
from services.ranking.service import RankingServicer, RankingSettings
from services.runtime.errors import InvalidArgument
from services.runtime.limits import (
    DEFAULT_MAX_ID_LENGTH,
    MAX_DETAILS_BYTES,
    bounded_details,
    check_lengths,
    echo,
)
from tests.unit.test_features_store import NS, FakeRedis, item_bytes, store, user_bytes
from tests.unit.test_rank_service import Context, rank_request, settings

LIMITS = RequestLimits(max_id_length=8, max_candidates=3, max_k=5)
HUGE = "x" * 100_000


def recommend(**fields: Any) -> gateway_pb2.RecommendRequest:
    return gateway_pb2.RecommendRequest(**{"user_id": "u1", "candidate_ids": ["i1", "i2"], **fields})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"user_id": "u" * 9}, "user_id is 9 characters; at most 8"),
        ({"user_id": HUGE}, "user_id is 100000 characters; at most 8"),
        ({"candidate_ids": ["i1", "i2", "i3", "i4"]}, "candidate_ids has 4 items; at most 3"),
        ({"candidate_ids": ["i1", "i" * 9]}, "candidate_ids[1] is 9 characters; at most 8"),
        ({"k": 0}, "k must be between 1 and 5, got 0"),
        ({"k": -3}, "k must be between 1 and 5, got -3"),
        ({"k": 6}, "k must be between 1 and 5, got 6"),
        ({"retrieve_candidates": 4}, "retrieve_candidates is 4; at most 3"),
        ({"offset": 2**32 - 1}, f"offset is {2**32 - 1}; at most 3"),
    ],
)
def test_each_field_past_its_limit_names_the_field_and_the_limit(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_recommend(recommend(**fields), LIMITS)
    assert str(raised.value) == message
    assert len(str(raised.value)) < 100  # never the value itself


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"user_id": "u" * 8, "candidate_ids": ["i" * 8] * 3},
        {"k": 1},
        {"k": 5},
        {"retrieve_candidates": 3, "candidate_ids": []},
        {"offset": 3},
        # What the limits leave to the pipeline: a user id at all, candidates or retrieval.
        {"user_id": "", "candidate_ids": []},
    ],
)
def test_requests_within_the_limits_pass(fields: dict[str, Any]) -> None:
    request = recommend(**fields)
    assert check_recommend(request, LIMITS) == list(request.candidate_ids)


def test_limits_are_settings_with_the_shared_default() -> None:
    gateway = GatewaySettings()
    assert gateway.max_id_length == DEFAULT_MAX_ID_LENGTH == 256
    assert FeaturesSettings().max_id_length == RankingSettings().max_id_length == DEFAULT_MAX_ID_LENGTH
    assert GatewaySettings(max_id_length=16).max_id_length == 16
    assert GatewaySettings.variable("max_id_length") == "GATEWAY_MAX_ID_LENGTH"


def test_echo_quotes_short_values_and_shortens_long_ones() -> None:
    assert echo("u42") == "'u42'"
    shortened = echo(HUGE)
    assert shortened.startswith("'xxx") and shortened.endswith("... (100000 characters)")
    assert len(shortened) < 100


def test_status_details_are_cut_to_a_bounded_size() -> None:
    assert bounded_details("unknown user 'u1'") == "unknown user 'u1'"
    for text in (HUGE, "é" * 100_000, "\U0001f600" * 100_000):
        details = bounded_details(f"bad {text}")
        assert len(details.encode()) <= MAX_DETAILS_BYTES and details.endswith("(truncated)")
        details.encode("utf-8")  # cut on a character boundary: still valid UTF-8


def test_check_lengths_names_the_first_long_id() -> None:
    check_lengths("ids", ["a", "bb"], 2)
    with pytest.raises(InvalidArgument, match=r"ids\[2\] is 3 characters; at most 2"):
        check_lengths("ids", ["a", "bb", "ccc", "dddd"], 2)


# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize(
    ("user_id", "item_ids", "message"),
    [
        (HUGE, ["i1"], f"user_id is 100000 characters; at most {DEFAULT_MAX_ID_LENGTH}"),
        ("u1", ["i1", HUGE], f"item_ids[1] is 100000 characters; at most {DEFAULT_MAX_ID_LENGTH}"),
    ],
)
async def test_features_refuses_long_ids_before_reading(user_id: str, item_ids: list[str], message: str) -> None:
    fake = FakeRedis()
    fake.data[user_key(NS, "u1")] = user_bytes(1.0)
    fake.data[item_key(NS, "i1")] = item_bytes(1.0, 1)
    # In a batch, the long one fails alone.
    long_one, fine = await store(fake).get_many([(user_id, item_ids), ("u1", ["i1"])])
    assert isinstance(long_one, InvalidArgument) and str(long_one) == message
    assert not isinstance(fine, Exception)
    fake.down = True  # any read would fail (and degrade): the limit comes first
    with pytest.raises(InvalidArgument) as raised:
        await store(fake).get(user_id, item_ids)
    assert str(raised.value) == message


async def test_features_echoes_unknown_ids_shortened() -> None:
    from services.runtime.errors import NotFound

    with pytest.raises(NotFound) as raised:
        await store(FakeRedis()).get("u" * 200, ["i1"])
    assert len(str(raised.value)) < 120 and "200 characters" in str(raised.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"user_id": HUGE}, f"user_id is 100000 characters; at most {DEFAULT_MAX_ID_LENGTH}"),
        ({"item_ids": ["i1", HUGE]}, f"item_ids[1] is 100000 characters; at most {DEFAULT_MAX_ID_LENGTH}"),
    ],
)
async def test_ranking_refuses_long_ids(fields: dict[str, Any], message: str) -> None:
    servicer = RankingServicer(settings(chain="category_cap", redis_url=""))
    request = rank_request(k=5)
    if "item_ids" in fields:
        request.item_ids[1] = fields["item_ids"][1]
    else:
        request.user_id = fields["user_id"]
    with pytest.raises(InvalidArgument) as raised:
        await servicer.Rank(request, Context())
    assert str(raised.value) == message


def test_scoring_refuses_names_no_repository_can_hold() -> None:
    from services.scoring.repository import _may_be_in_repository

    assert _may_be_in_repository("ranker")
    for name in ("", ".hidden", "a/b", "nul\x00", "m" * 256, "é" * 128):
        assert not _may_be_in_repository(name), name
