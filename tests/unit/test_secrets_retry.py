"""Credential masking (tasks/secrets.py) and bounded retries (tasks/retry.py)."""

from __future__ import annotations

import pytest

from tasks.retry import Backoff, ServiceUnavailableError, retry
from tasks.secrets import env_secrets, redact, redact_obj, redact_url, unmask


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("https://user:s3cr3t-pw@host:8443/path?x=1", "https://user:***@host:8443/path?x=1"),
        ("postgresql+psycopg2://mlflow:pw-123456@db:5432/mlflow", "postgresql+psycopg2://mlflow:***@db:5432/mlflow"),
        ("s3://AKIAKEY:SECRET/with+slash@bucket/prefix", "s3://AKIAKEY:***@bucket/prefix"),
        ("https://host/file?X-Amz-Signature=abc&X-Amz-Date=1", "https://host/file?X-Amz-Signature=***&X-Amz-Date=1"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("ssh://git@host/repo", "ssh://git@host/repo"),
        ("/plain/local/path", "/plain/local/path"),
        ("sqlite:////ws/mlflow.db", "sqlite:////ws/mlflow.db"),
    ],
)
def test_redact_url(url, masked):
    assert redact_url(url) == masked
    assert unmask(masked, ["http://other", url]) == url


def test_redact_text_env_and_nested(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-sentinel")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:pass-sentinel@127.0.0.1:5000")
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to be masked in free text
    assert {"wJalrXUtnFEMI-sentinel", "pass-sentinel"} <= set(env_secrets())
    text = "push to s3://b failed (key wJalrXUtnFEMI-sentinel); see https://u:pw123456@h/x and pass-sentinel"
    assert redact(text) == "push to s3://b failed (key ***); see https://u:***@h/x and ***"
    nested = {"version": {"remote": "https://u:pw123456@h/x", "n": 1, "l": ["a", "pass-sentinel"]}}
    assert redact_obj(nested) == {"version": {"remote": "https://u:***@h/x", "n": 1, "l": ["a", "***"]}}
    assert redact("1 and 1") == "1 and 1"
    assert unmask("https://u:***@h/x", ["https://u:other@h/y"]) is None


def test_params_record_masked_remote_and_hash_ignores_the_password():
    from tasks.config import load_params

    a = load_params(None, ["version.remote=https://u:first-password@h/dvc"])
    b = load_params(None, ["version.remote=https://u:second-password@h/dvc"])
    assert a.version.remote == "https://u:first-password@h/dvc"  # the real value, for connecting
    assert a.as_dict()["version"]["remote"] == "https://u:***@h/dvc"
    assert a.digest() == b.digest()


def test_retry_backs_off_then_names_the_service():
    calls, sleeps = [], []

    def down() -> None:
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ServiceUnavailableError) as err:
        retry(
            down,
            "MLflow tracking server at http://u:pw-secret@127.0.0.1:9",
            Backoff(4, 0.5, 2.0, 1.5),
            sleep=sleeps.append,
        )
    assert len(calls) == 4 and sleeps == [0.5, 1.0, 1.5]
    message = str(err.value)
    assert message.startswith("MLflow tracking server at http://u:***@127.0.0.1:9 is unreachable after 4 attempts")
    assert "Connection refused" in message and "pw-secret" not in message


def test_retry_returns_once_the_service_answers_and_does_not_retry_other_errors():
    attempts = iter([OSError("down"), OSError("down"), "ok"])

    def flaky() -> str:
        item = next(attempts)
        if isinstance(item, Exception):
            raise item
        return item

    assert retry(flaky, "svc", Backoff(3, 0.0), sleep=lambda _: None) == "ok"
    with pytest.raises(KeyError):
        retry(lambda: {}["x"], "svc", Backoff(3, 0.0), sleep=lambda _: None)


def test_mlflow_http_retries_are_bounded_by_track_params(monkeypatch):
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    from tasks.tracking import configure_http

    for var in (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_TIMEOUT):
        monkeypatch.delenv(var.name, raising=False)
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 7  # MLflow's default: minutes of retries against a dead server
    configure_http(retries=2, backoff=0.5, timeout=2.5)
    assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()) == (2, 1)  # whole s
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 3


def test_s3_server_log_filter_blanks_query_signed_credentials(caplog):
    """infra/local/s3_server.py: moto's access log line of a presigned request loses the key id, keeps the rest."""
    import importlib.util
    import logging
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("s3_server", Path(__file__).parents[2] / "infra/local/s3_server.py")
    s3_server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(s3_server)
    line = (
        '127.0.0.1 - - "GET /dvc-remote/a/b?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAABCDEFGHIJKLMNOP'
        '%2F20261201%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=0f1e2d HTTP/1.1" 200 -'
    )
    logger = logging.getLogger("werkzeug-test")
    logger.addFilter(s3_server.Redact())
    with caplog.at_level(logging.INFO, logger="werkzeug-test"):
        logger.info("%s", line)
        logger.info("sigv2 %s", "/b/k?AWSAccessKeyId=ASIAABCDEFGHIJKLMNOP&Signature=abc%3D&Expires=1")
    text = caplog.text
    assert "AKIAABCDEFGHIJKLMNOP" not in text and "ASIAABCDEFGHIJKLMNOP" not in text and "0f1e2d" not in text
    assert "GET /dvc-remote/a/b?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***" in text
    assert "Expires=1" in text and '200 -' in text
