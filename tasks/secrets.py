"""Masking credentials wherever the pipeline records or prints something: one helper for every URL and message.

Credentials reach the pipeline in three ways: inside URLs (``https://user:PASSWORD@host/...``,
``postgresql://user:PASSWORD@db/mlflow``, ``...?token=...``), in environment variables (``AWS_SECRET_ACCESS_KEY``,
``MLFLOW_TRACKING_PASSWORD``, ...), and, through both, in error messages of the libraries that use them. What the
pipeline writes (MLflow params and tags, manifests, the workspace's params.yaml, log lines, Prefect artifacts,
error messages) goes through :func:`redact` or :func:`redact_url` first; code that needs the real value (to
connect) reads it where it was given and never records it.

The masked form keeps everything but the secret (``https://user:***@host/path``), so a reader still sees which
service was used, and :func:`unmask` can find the real URL again among candidates the user holds (the environment,
the workspace's git-ignored ``.dvc/config.local``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

SECRET_QUERY_KEYS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "access_token",
        "api_key",
        "apikey",
        "key",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "sas",
        "client_secret",
    }
)
"""Query parameters whose values are masked (compared case-insensitively)."""

_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|API_KEY|AUTH)", re.I)
"""Names of environment variables whose values are secrets wherever they show up in text."""

_MIN_ENV_SECRET = 6  # shorter values ("1", "true") would mask ordinary words

# scheme://userinfo@ ... up to the end of the URL (whitespace, quotes, brackets end it)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>()\[\]{}`]+")


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo and the values of secret query parameters replaced by ``***``.

    Anything that is not a URL with a scheme (a local path, a plain word) is returned unchanged.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    if "@" not in authority and ":" in authority and "@" in rest.split("?", 1)[0].split("#", 1)[0]:
        # a password with '/' in it (AWS secret keys have them) ends the URL's authority early: mask up to the '@'
        user, _, after = authority.partition(":")
        if user and not after.isdigit():
            return redact_url(f"{scheme}://{user}:{MASK}@{rest.split('@', 1)[1]}")
    try:
        parts = urlsplit(url)
    except ValueError:
        return _mask_userinfo_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY_KEYS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _mask_userinfo_text(text: str) -> str:
    return re.sub(r"(://[^/\s:@]*):[^/\s@]*@", rf"\1:{MASK}@", text)


def env_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """Values of the environment variables that hold secrets (by name), longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_ENV.search(k) and v and len(v) >= _MIN_ENV_SECRET}
    # credentials inside URL-valued variables (MLFLOW_TRACKING_URI=https://user:pw@...) count too
    for value in env.values():
        if "://" not in value or "@" not in value:
            continue
        try:
            userinfo = urlsplit(value).netloc.rpartition("@")[0]
        except ValueError:
            continue
        password = userinfo.partition(":")[2]
        if len(password) >= _MIN_ENV_SECRET:
            values.add(password)
    return sorted(values, key=len, reverse=True)


def redact(text: Any, extra: Iterable[str] = ()) -> Any:
    """Mask credentials in free text: every URL in it (:func:`redact_url`), then every value of a secret
    environment variable and every string of ``extra``. Non-strings are returned unchanged."""
    if not isinstance(text, str) or not text:
        return text
    out = _URL.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text
    for secret in [*env_secrets(), *(s for s in extra if s)]:
        if secret in out:
            out = out.replace(secret, MASK)
    return out


def redact_obj(obj: Any) -> Any:
    """:func:`redact` applied to every string in nested dicts, lists and tuples (keys included)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


def is_masked(url: str | None) -> bool:
    return isinstance(url, str) and MASK in url


def unmask(recorded: str | None, candidates: Iterable[str | None]) -> str | None:
    """The real URL among ``candidates`` whose masked form is ``recorded`` (None if there is none).

    A recorded URL without a mask is returned as it is.
    """
    if not is_masked(recorded):
        return recorded
    for candidate in candidates:
        if candidate and redact_url(candidate) == recorded:
            return candidate
    return None
