"""What a shown job hides: secret-looking values.

The log keeps a job as it was submitted (it must run as asked), so an API key typed on a
command line, put in a config, or (in logs written before environments were kept out of
them) exported in an environment is in it. Every view of a job passes it through here
first: the API (``/api/jobs/{id}``, its events, ``/api/queue``, the event stream) and the
commands that read the log itself (``eventq replay show``, ``eventq replay why``). A hidden
value reads ``<redacted>``.

A value is secret-looking when

* its name looks secret: it contains SECRET, PASSW(ORD), PASSPHRASE, CREDENTIAL, PRIVATE,
  COOKIE or AUTHORIZATION, or it ends with KEY, TOKEN or AUTH (any case). The name is an
  environment variable's, a config's or metadata's key, or a command-line flag's
  (``--hub_token X``, ``--api-key=X``, ``WANDB_API_KEY=X`` in a shell string). Ending, not
  containing, for the short words: ``--max_tokens 512``, ``TOKENIZERS_PARALLELISM`` and
  ``SSH_AUTH_SOCK`` stay visible;
* or, whatever its name, it looks like a token: it starts with a well-known token prefix
  (``hf_``, ``sk-``, ``ghp_``, ``github_pat_``, ``glpat-``, ``xoxb-``, ``AKIA``…, and
  eventq's own ``eq_`` and ``wt_``), it is a JWT, it is the password in a URL
  (``https://user:PASSWORD@host``), or it is a run of 32 or more letters, digits and
  ``-_+/=`` that mixes upper case, lower case and digits as a generated key does (hex
  digests, UUIDs, paths and words do not).

A job's ``notify_url`` (and the server's, ``server_notify_url_set``) keeps only its origin:
a webhook's path is often its secret.

Erring towards hiding is the cheap side: a harmless ``MONKEY=1`` is hidden too.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

from eventq.callbacks.urls import shown

REDACTED = "<redacted>"

_SECRET_NAME = re.compile(
    r"secret|passw|passphrase|credential|private|cookie|authorization|(?:key|token|auth)$",
    re.IGNORECASE)
_PREFIXED = re.compile(
    r"(?<![A-Za-z0-9])(?:hf_|sk-|sk_live_|rk_live_|pk_live_|ghp_|gho_|ghs_|ghu_|ghr_|"
    r"github_pat_|glpat-|xox[abprs]-|npm_|pypi-|eq_|wt_)[A-Za-z0-9_\-]{16,}"
    r"|(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])"
    r"|(?<![A-Za-z0-9])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)([^/\s@]+)(@)")
_RUN = re.compile(r"[A-Za-z0-9+/=_\-]{32,}")
_SEPARATORS = re.compile(r"[^A-Za-z0-9]+")
#: ``--flag VALUE``, ``--flag=VALUE`` and ``NAME=VALUE`` in a shell string; the value is
#: only looked ahead at, so that a flag's value is never taken for the next name.
_ASSIGNED = re.compile(
    r"""(?P<name>(?<![\w-])--?[A-Za-z][\w.-]*(?P<fsep>=|\s+)|(?<![\w.-])[A-Za-z_]\w*=)"""
    r"""(?=(?P<value>"[^"]*"|'[^']*'|[^\s"'-][^\s"']*))""")


def secret_name(name: str) -> bool:
    """Does a variable, key or flag of this name hold a secret?"""
    return bool(_SECRET_NAME.search(name.lstrip("-")))


def _generated(run: str) -> bool:
    """Does this run of key characters read as generated (random), not as words? Its
    alphanumeric pieces hold one of 10 or more characters, and together they mix upper
    case, lower case and digits, changing kind every third character or more often (a
    random key about every other one; names, paths and dates far less)."""
    pieces = _SEPARATORS.split(run)
    if max(len(p) for p in pieces) < 10:
        return False
    alnum = "".join(pieces)
    if not (any(c.isupper() for c in alnum) and any(c.islower() for c in alnum)
            and any(c.isdigit() for c in alnum)):
        return False
    changes = 0
    for piece in pieces:
        kinds = [0 if c.isupper() else 1 if c.islower() else 2 for c in piece]
        changes += sum(a != b for a, b in itertools.pairwise(kinds))
    return changes * 3 >= len(alnum)


def redact_text(text: str) -> str:
    """``text`` with every token-looking part hidden (a URL keeps all but its password)."""
    if len(text) < 8:
        return text
    text = _URL_PASSWORD.sub(lambda m: m[1] + REDACTED + m[3], text)
    text = _PREFIXED.sub(REDACTED, text)
    return _RUN.sub(lambda m: REDACTED if _generated(m[0]) else m[0], text)


def redact_shell(text: str) -> str:
    """A shell string: token-looking parts, and the values given to secret-looking flags
    and variables (``--hub_token X``, ``HF_TOKEN=X``)."""
    hidden: list[tuple[int, int]] = []
    for m in _ASSIGNED.finditer(text):
        if secret_name(m["name"].rstrip("= \t\n")):
            hidden.append(m.span("value"))
    for start, end in reversed(hidden):
        text = text[:start] + REDACTED + text[end:]
    return redact_text(text)


def redact_command(command: list[str] | str) -> list[str] | str:
    """A command as shown: what follows a secret-looking flag, and token-looking words."""
    if isinstance(command, str):
        return redact_shell(command)
    out: list[str] = []
    hide_next = False
    for word in command:
        name, eq, _ = word.partition("=")
        if hide_next:
            out.append(REDACTED)
        elif eq and (name.startswith("-") or name.isidentifier()) and secret_name(name):
            out.append(name + eq + REDACTED)
        else:
            out.append(redact_text(word))
        hide_next = word.startswith("-") and not eq and secret_name(word)
    return out


def redact_env(env: dict[str, str]) -> dict[str, str]:
    return {k: REDACTED if secret_name(k) else redact_text(v) for k, v in env.items()}


def redact_value(value: Any) -> Any:
    """A JSON value (a config, metadata): values under secret-looking keys, and
    token-looking strings anywhere in it."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and secret_name(k) and value_like(v)
                else redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def value_like(value: Any) -> bool:
    """A scalar a secret could be (not a nested object, which is searched instead)."""
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def redact_url(url: str) -> str:
    """A notification's URL: its origin only (a webhook's path is often its secret)."""
    return shown(url)


_JOB_FIELDS: dict[str, Callable[[Any], Any]] = {
    "env": redact_env, "command": redact_command, "config": redact_value,
    "metadata": redact_value, "notify_url": redact_url}


def redact_job(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the API shows it (a JobSpec as builtins, or the API's record of a job)."""
    return {k: _JOB_FIELDS[k](v) if k in _JOB_FIELDS and v else v for k, v in job.items()}


def redact_body(event_type: str, body: dict[str, Any]) -> dict[str, Any]:
    """An event's body as shown: a submission's job redacted, the rest as it is."""
    if event_type == "job_submitted" and isinstance(body.get("job"), dict):
        return {**body, "job": redact_job(body["job"])}
    if event_type == "server_notify_url_set" and isinstance(body.get("url"), str):
        return {**body, "url": redact_url(body["url"])}
    return body
