"""Credentials travel by reference, never by value.

branchout writes what it knows about a run into many places: spec.yaml, state.json, the
registry, driver logs, the Ray job's runtime_env (visible to anyone who can list jobs),
and the terminal. None of them may hold a secret. So:

- URIs with embedded credentials are refused at validate time (``orchestrator.config.checks``);
- the registry URL forwarded to a submitted driver has its password removed: the cluster's
  drivers read it from their own environment (``PGPASSWORD``, a mounted ``~/.pgpass`` or
  ``BRANCHOUT_REGISTRY_PASSWORD_FILE``), which the operator provides once (deploy/README.md);
- the Ray token and cloud keys are never read into runtime_env at all;
- anything printed that may hold a URL goes through ``mask``.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def mask(url: str | None) -> str:
    """``url`` with any password replaced by ``***`` (for printing)."""
    return _replace_password(url, MASK) if url else ""


def without_password(url: str) -> str:
    """``url`` with the password removed (for forwarding to another process by reference)."""
    return _replace_password(url, None)


def has_password(url: str | None) -> bool:
    try:
        return bool(url and "://" in url and urlsplit(url).password)
    except ValueError:
        return True


def secret_key(name: str) -> bool:
    """Whether a setting or query parameter called ``name`` holds a secret."""
    import re

    return bool(re.search(r"pass(word|wd)?$|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|session[_-]?key"
                          r"|credential"
                          r"|signature|auth", str(name), re.IGNORECASE))


def _replace_password(url: str, replacement: str | None) -> str:
    """The password and every secret query parameter (``?password=``, ``sslpassword``,
    ``token``, ...) replaced by ``replacement``, or removed when it is None."""
    from urllib.parse import parse_qsl, urlencode

    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return MASK  # unparsable userinfo: show nothing of it
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(secret_key(k) for k, _ in query):
        kept = [(k, replacement) if secret_key(k) else (k, v) for k, v in query
                if replacement is not None or not secret_key(k)]
        parts = parts._replace(query=urlencode(kept, safe="*"))
        url = urlunsplit(parts)
    if not password:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    userinfo = f"{user}:{replacement}" if replacement is not None else user
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))
