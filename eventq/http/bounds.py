"""What a client may send: the bound of every free-form field of a request.

This module guards a promise: no request, however large or strange, makes the server fail,
stores more than it can read back, or hands a process what exec would refuse. Each bound is
declared once, here, as a msgspec type, so the decoder enforces it, the OpenAPI document
states it, and a 422 names the field and the limit; docs/api.md lists them all. What msgspec
cannot check as it decodes (sizes of whole fields, nesting of free JSON) is checked by the
functions at the end.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta

#: No control characters (C0 and DEL): names are printed in tables and on terminals.
PRINTABLE = "^[^\\x00-\\x1f\\x7f]*$"
#: No NUL: exec and the file system would refuse it later, when nobody can hear why.
NO_NUL = "^[^\\x00]*$"
#: An environment variable's name: not empty, no ``=`` and no NUL.
ENV_NAME = "^[^=\\x00]+$"
CONTROL = re.compile("[\x00-\x1f\x7f]")
#: What each pattern means, for the messages of a 422.
PATTERN_WORDS = {
    PRINTABLE: "must not contain control characters",
    NO_NUL: "must not contain NUL characters",
    ENV_NAME: "must be a variable name (not empty, no '=' or NUL)",
}

NAME_CHARS = 200
#: Linux refuses a single argument or environment string past 128 KiB (MAX_ARG_STRLEN).
WORD_CHARS = 131_072
COMMAND_WORDS = 4_096
COMMAND_CHARS = 262_144
ENV_VARS = 4_096
ENV_NAME_CHARS = 1_024
#: The environment a shell passes to exec fits in ARG_MAX (2 MiB by default).
ENV_CHARS = 2_097_152
#: PATH_MAX.
PATH_CHARS = 4_096
FILE_NAME_CHARS = 255
METADATA_BYTES = 65_536
CONFIG_BYTES = 262_144
#: Levels of nesting in metadata and config: far more than any real use, far fewer than
#: the decoders' recursion allows, so what is stored can always be read back.
JSON_DEPTH = 32
LABELS = 64
LABEL_KEY_CHARS = 128
LABEL_VALUE_CHARS = 256
TEAM_CHARS = 64
REFERENCE_CHARS = 200
REASON_CHARS = 500
#: A GPU index (NVML's) and the number of GPUs of one node.
GPUS = 4_096
#: Memory of one GPU, in GB.
GPU_MEMORY_GB = 100_000.0
#: A year and a day, in seconds: the longest runtime a job may state.
RUNTIME_SECONDS = 31_622_400.0
#: 9999-12-31T23:59:59Z: the last time ``datetime`` can read back.
LAST_EPOCH = 253_402_300_799.0
COST = 1e12
JOB_ID_CHARS = 64
#: What a worker says about an attempt's end.
DETAIL_CHARS = 65_536
ATTEMPTS = 1_000_000
RUNNING = 4_096
#: A notification's URL (``notify_url``): what browsers and proxies reliably carry.
URL_CHARS = 2_048


def _text(chars: int, min_chars: int = 0) -> Meta:
    """Printable text of at most ``chars`` characters."""
    return Meta(min_length=min_chars, max_length=chars, pattern=PRINTABLE)


def _unchecked(chars: int, pattern: str, about: str | None = None) -> Meta:
    """Text whose pattern is checked by code that looks at a whole request at once (a batch
    of 10,000 commands is searched for NUL once), not per string: stated all the same."""
    return Meta(max_length=chars, extra_json_schema={"pattern": pattern}, description=about)


#: Checked by ``build_spec``: a batch's 10,000 names are searched at once.
JobName = Annotated[str, _unchecked(NAME_CHARS, PRINTABLE)]
Team = Annotated[str, _text(TEAM_CHARS)]
#: A worker's display name, a GPU's model, a driver's version.
ShortName = Annotated[str, _text(NAME_CHARS, min_chars=1)]
FileName = Annotated[str, _text(FILE_NAME_CHARS, min_chars=1)]
ConfigName = Annotated[str, _text(FILE_NAME_CHARS)]
#: A job's id or name: one with control characters names no job, and is refused as such.
Reference = Annotated[str, Meta(max_length=REFERENCE_CHARS)]
JobId = Annotated[str, _text(JOB_ID_CHARS)]
WorkerId = Annotated[str, _text(JOB_ID_CHARS)]
#: A GPU's model or driver, a host's name: empty when a worker cannot tell.
Model = Annotated[str, _text(NAME_CHARS)]
Detail = Annotated[str, Meta(max_length=DETAIL_CHARS)]
Word = Annotated[str, _unchecked(WORD_CHARS, NO_NUL)]
Words = Annotated[list[Word], Meta(max_length=COMMAND_WORDS, description=(
    f"At most {COMMAND_WORDS} words of at most {WORD_CHARS} characters, "
    f"{COMMAND_CHARS} characters in all; no NUL."))]
ShellLine = Annotated[str, _unchecked(WORD_CHARS, NO_NUL, "One line for sh -c; no NUL.")]
Path = Annotated[str, _unchecked(PATH_CHARS, NO_NUL)]
EnvName = Annotated[str, Meta(max_length=ENV_NAME_CHARS, extra_json_schema={
    "pattern": ENV_NAME, "minLength": 1})]
EnvValue = Annotated[str, _unchecked(WORD_CHARS, NO_NUL)]
Env = Annotated[dict[EnvName, EnvValue], Meta(max_length=ENV_VARS, description=(
    f"At most {ENV_VARS} variables, {ENV_CHARS} characters of names and values in all."))]
LabelKey = Annotated[str, _text(LABEL_KEY_CHARS, min_chars=1)]
LabelValue = Annotated[str, _text(LABEL_VALUE_CHARS)]
Labels = Annotated[dict[LabelKey, LabelValue], Meta(max_length=LABELS)]
FreeJson = Annotated[dict[str, Any], Meta(description=(
    f"Any JSON object of at most {METADATA_BYTES} bytes, nested at most {JSON_DEPTH} "
    "levels."))]
Config = Annotated[dict[str, Any], Meta(description=(
    f"Any JSON object of at most {CONFIG_BYTES} bytes, nested at most {JSON_DEPTH} "
    "levels."))]
Runtime = Annotated[float, Meta(gt=0, le=RUNTIME_SECONDS)]
Epoch = Annotated[float, Meta(ge=0, le=LAST_EPOCH)]
IsoTime = Annotated[str, _text(64, min_chars=1)]
Cost = Annotated[float, Meta(ge=0, le=COST)]
GpuIndex = Annotated[int, Meta(ge=0, lt=GPUS)]
GpuCount = Annotated[int, Meta(ge=0, le=GPUS)]
MemoryGb = Annotated[float, Meta(ge=0, le=GPU_MEMORY_GB)]
Percent = Annotated[float, Meta(ge=0, le=100)]
Attempt = Annotated[int, Meta(ge=1, le=ATTEMPTS)]
Pid = Annotated[int, Meta(ge=0, le=2**31 - 1)]
ExitCode = Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)]
#: [job id, attempt] of the attempts a worker still runs.
Running = Annotated[list[tuple[JobId, Attempt]], Meta(max_length=RUNNING)]
Reason = Annotated[str, _text(REASON_CHARS)]
#: A rejection's reason: printable, with at least one character that is not a space.
RejectReason = Annotated[str, Meta(min_length=1, max_length=REASON_CHARS,
                                   pattern="^[^\\x00-\\x1f\\x7f]*[^\\x00-\\x20\\x7f][^\\x00-\\x1f\\x7f]*$")]
NotifyUrl = Annotated[str, Meta(min_length=1, max_length=URL_CHARS, pattern=PRINTABLE,
                                description="An absolute http:// or https:// URL.")]


_encode = msgspec.json.Encoder().encode


def json_problem(field: str, value: dict[str, Any], limit: int) -> str | None:
    """Why ``value`` is past ``limit`` bytes as JSON or ``JSON_DEPTH`` levels deep, if it
    is. Every row of a batch passes here: the usual value costs one encode and a count."""
    try:
        encoded = _encode(value)
    except RecursionError:
        return f"{field} is nested more than {JSON_DEPTH} levels deep"
    if len(encoded) > limit:
        return f"{field} is {len(encoded)} bytes as JSON; the limit is {limit}"
    # Only text with that many brackets can nest that deep: most values are never walked.
    if encoded.count(b"{") + encoded.count(b"[") > JSON_DEPTH and \
            depth(value, JSON_DEPTH + 1) > JSON_DEPTH:
        return f"{field} is nested more than {JSON_DEPTH} levels deep"
    return None


def depth(value: Any, stop: int) -> int:
    """How deep ``value`` nests (a scalar is 0, ``{}`` is 1), counting no further than
    ``stop``; iterative, so no value is too deep to measure."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item \
            if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest >= stop:
            return deepest
        todo.extend((child, level + 1) for child in children)
    return deepest
