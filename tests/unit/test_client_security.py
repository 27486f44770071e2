"""The client's security options: what reaches the channel and every call, from arguments or
the environment, and the contradictions it refuses (no network: channels are never used)."""

from __future__ import annotations

from pathlib import Path

import pytest

from infermesh.certs import generate
from infermesh.client import MeshClient
from infermesh.client.client import channel_options
from infermesh.client.security import security

ENV = ("INFERMESH_TLS", "INFERMESH_TLS_CA_FILE", "INFERMESH_TLS_CERT_FILE", "INFERMESH_TLS_KEY_FILE")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*ENV, "INFERMESH_API_KEY", "INFERMESH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_plaintext_without_credentials_by_default() -> None:
    secured = security(["127.0.0.1:8080"])
    assert secured.credentials is None and secured.metadata == ()


def test_an_api_key_from_the_environment_goes_as_x_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_API_KEY", "k-123")
    assert security(["localhost:8080"]).metadata == (("x-api-key", "k-123"),)


def test_a_token_goes_as_a_bearer_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_TOKEN", "eyJ.x.y")
    assert security(["127.0.0.1:8080"]).metadata == (("authorization", "Bearer eyJ.x.y"),)


def test_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_API_KEY", "from-env")
    assert security(["127.0.0.1:8080"], api_key="given").metadata == (("x-api-key", "given"),)


def test_a_key_and_a_token_together_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_API_KEY", "k")
    monkeypatch.setenv("INFERMESH_TOKEN", "t")
    with pytest.raises(ValueError, match="INFERMESH_API_KEY or INFERMESH_TOKEN"):
        security(["127.0.0.1:8080"])


def test_credentials_never_cross_the_network_in_the_clear() -> None:
    with pytest.raises(ValueError, match="in the clear") as refused:
        security(["edge.example:443"], token="secret-token")
    assert "secret-token" not in str(refused.value)


def test_tls_with_system_roots_then_credentials_may_go_anywhere() -> None:
    secured = security(["edge.example:443"], tls=True, token="tok-secret-99")
    assert secured.credentials is not None
    assert "tok-secret-99" not in repr(secured)


def test_a_ca_file_turns_tls_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certs = generate(tmp_path)
    monkeypatch.setenv("INFERMESH_TLS_CA_FILE", str(certs.ca_cert))
    assert security(["edge.example:443"]).credentials is not None


def test_a_client_certificate_needs_its_key(tmp_path: Path) -> None:
    certs = generate(tmp_path)
    with pytest.raises(ValueError, match="INFERMESH_TLS_KEY_FILE"):
        security(["127.0.0.1:8080"], cert_file=str(certs.client_cert))


def test_tls_files_with_tls_off_are_a_contradiction(tmp_path: Path) -> None:
    certs = generate(tmp_path)
    with pytest.raises(ValueError, match="tls=False"):
        security(["127.0.0.1:8080"], tls=False, ca_file=str(certs.ca_cert))


def test_an_unreadable_ca_file_is_named() -> None:
    with pytest.raises(ValueError, match="cannot read the CA file /nonexistent/ca.crt"):
        security(["127.0.0.1:8080"], ca_file="/nonexistent/ca.crt")


@pytest.mark.parametrize("attempts", [0, 6])
def test_retry_attempts_are_bounded(attempts: int) -> None:
    with pytest.raises(ValueError, match="max_attempts must be 1 to 5"):
        channel_options(attempts)


def test_the_client_keeps_its_key_out_of_its_repr() -> None:
    with MeshClient(["127.0.0.1:1"], api_key="hidden-key-42") as client:
        assert "hidden-key-42" not in repr(client) and "hidden-key-42" not in repr(vars(client))
