"""A generated corpus of broken calls of the REST API's routes other than STOW-RS
(tests/test_rest_faults.py; STOW-RS has its own, tests/http_faults.py).

Each call starts as a valid call of one route (trigger, reprocess, purge, cancel, the
jobs of a study, a retry by JSON or by the status page's form, the status page, /status,
/metrics, /health, and the scale-out workers' routes: started, results, a prior
result, WADO-RS) on the run the test stored, with a token of every scope, and gets
one to three mutations drawn from what a broken or hostile client sends: JSON
values of the wrong type or beyond any range (nesting deeper than the parser's
recursion, integers past SQLite's, 1e999, NaN, lone surrogates, NUL), keys
dropped, added or repeated, bodies that are not a JSON object (other encodings,
invalid UTF-8, cut short, trailing bytes), query strings (keys repeated or
empty, percent-escapes that decode to nothing, numbers written as hex or
infinity), path segments (ids out of range or in other digits, doubled or
encoded slashes), methods, media types, Content-Length, and the Authorization
header. Each case says what it did, so a failure names the mutations."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from tests.http_faults import mutate

CRLF = b"\r\n"


@dataclass
class Call:
    """A raw HTTP request, built from its parts so that mutations can change any."""

    method: str
    path: str
    query: list[tuple[str, str]] = field(default_factory=list)  # already %-encoded
    json: Any = None  # the body as JSON (None: no body unless ``raw``)
    raw: bytes | None = None  # the body as bytes, instead of ``json``
    content_type: str | None = "application/json"
    token: str = ""  # Authorization: Bearer <token>; "" leaves the header out
    authorization: bytes | None = None  # a mutated Authorization value
    length_delta: int | None = 0  # Content-Length minus the body's; None: no header
    length_text: bytes | None = None  # a Content-Length that is not a number
    done: list[str] = field(default_factory=list)

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        if self.json is None:
            return b""
        return _dump(self.json).encode()

    def encode(self) -> bytes:
        body = self.body()
        target = self.path + (
            "?" + "&".join(f"{k}={v}" for k, v in self.query) if self.query else ""
        )
        lines = [f"{self.method} {target} HTTP/1.1".encode("latin-1"), b"Host: node"]
        if self.authorization is not None:
            lines.append(b"Authorization: " + self.authorization)
        elif self.token:
            lines.append(f"Authorization: Bearer {self.token}".encode())
        if body or self.method == "POST":
            if self.content_type is not None:
                lines.append(f"Content-Type: {self.content_type}".encode("latin-1"))
            if self.length_text is not None:
                lines.append(b"Content-Length: " + self.length_text)
            elif self.length_delta is not None:
                lines.append(f"Content-Length: {len(body) + self.length_delta}".encode())
        return CRLF.join(lines) + CRLF + CRLF + body


def valid_calls(ctx: dict[str, Any]) -> list[Callable[[random.Random], Call]]:
    """A valid call of each route. ``ctx``: ``study``, ``series``, ``sop`` (a stored
    run), ``job`` (a job id), ``failed_job`` (a failed one), ``token`` (every scope),
    ``csrf`` (the status page's form field for that token)."""
    study, series, sop = ctx["study"], ctx["series"], ctx["sop"]
    wado = f"/dicom-web/studies/{study}/series/{series}"

    def selector(rng: random.Random) -> dict[str, Any]:
        key, value = rng.choice(
            [("study_uid", study), ("series_uid", series), ("sop_instance_uid", sop)]
        )
        return {key: value}

    return [
        lambda rng: Call("POST", "/trigger", json=selector(rng)),
        lambda rng: Call("POST", "/reprocess", json={"series_uid": series}),
        lambda rng: Call("POST", "/purge", json=selector(rng)),
        lambda rng: Call("POST", "/cancel", json=selector(rng)),
        lambda rng: Call(
            "GET", "/jobs", [rng.choice([("study", study), ("series", series), ("instance", sop)])]
        ),
        lambda rng: Call("POST", f"/jobs/{ctx['failed_job']}/retry", json={}),
        lambda rng: Call(
            "POST",
            f"/jobs/{ctx['failed_job']}/retry",
            raw=f"csrf={quote(ctx['csrf'])}".encode(),
            content_type="application/x-www-form-urlencoded",
        ),
        lambda rng: Call("GET", "/", [("hours", "24"), ("message", "hello")]),
        lambda rng: Call("GET", rng.choice(["/status", "/metrics", "/health"])),
        lambda rng: Call(
            "POST",
            f"/worker/jobs/{ctx['job']}/started",
            json={"generation": 1, "attempt": 1, "worker": "w1"},
        ),
        lambda rng: Call(
            "POST",
            f"/worker/jobs/{ctx['job']}/results",
            [("generation", "1")],
            raw=b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--b--\r\n",
            content_type='multipart/related; type="application/dicom"; boundary=b',
        ),
        lambda rng: Call("GET", f"/worker/results/{sop}"),
        lambda rng: Call("GET", f"/worker/jobs/{ctx['job']}/instances", [("generation", "0")]),
        lambda rng: Call("GET", rng.choice([wado, f"{wado}/instances/{sop}"])),
    ]


def _hostile_values(rng: random.Random) -> list[Callable[[], Any]]:
    """JSON values a field should not get (``Raw`` for text json.dumps cannot write)."""
    return [
        lambda: Raw("[" * rng.choice([1_500, 3_000, 200_000]) + "]" * 3),
        lambda: Raw('{"a":' * rng.choice([1_500, 100_000]) + "1" + "}" * 3),
        lambda: 10 ** rng.choice([19, 30, 400]),
        lambda: -rng.choice([1, 2**63]),
        lambda: Raw(rng.choice(["1e999", "-1e999", "NaN", "Infinity", "-0.0", "1.5"])),
        lambda: rng.choice([True, False, None, "", " ", "0"]),
        lambda: "1." * rng.choice([40, 50_000]),
        lambda: rng.choice(["1.2\x00", "1.2/../..", "1.2\n3", "1.2.3\n", "١.٢", "𝟏.𝟐"]),
        lambda: Raw('"\\ud800"'),
        lambda: rng.choice([["1.2"], [], {"a": 1}, [[["1.2"]]]]),
    ]


@dataclass
class Raw:
    """JSON text put into a body as is (deep nesting, NaN, 1e999, lone surrogates)."""

    text: str


def _dump(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    return json.dumps(value, allow_nan=True)


def _mutations(rng: random.Random) -> list[Callable[[Call], None]]:
    values = _hostile_values(rng)

    def json_of(c: Call) -> dict[str, Any]:
        if not isinstance(c.json, dict) or c.raw is not None:
            c.raw, c.json = None, {}
            c.content_type = "application/json"
        return c.json

    def value(c: Call) -> None:
        body = json_of(c)
        key = rng.choice([*body, "study_uid", "series_uid", "run_id", "generation", "attempt"])
        body[key] = rng.choice(values)()

    def keys(c: Call) -> None:
        body = json_of(c)
        choice = rng.randrange(4)
        if choice == 0 and body:
            del body[rng.choice(list(body))]
        elif choice == 1:
            body.update({f"k{i}": i for i in range(rng.choice([3, 5_000]))})
        elif choice == 2:
            body.update({"study_uid": "1.2.3", "series_uid": "1.2.4"})  # two selectors
        else:  # a key repeated with another value (json.loads keeps the last)
            text = _dump(body)
            c.raw = (text[:-1] + ("," if body else "") + '"study_uid":[1]}').encode()

    def not_an_object(c: Call) -> None:
        text = _dump(c.json if isinstance(c.json, dict) else {})
        c.raw = rng.choice(
            [
                b"",
                b"   ",
                b"[]",
                b'"x"',
                b"12",
                b"null",
                b"\xef\xbb\xbf" + text.encode(),  # a BOM
                text.encode("utf-16"),
                text.encode("utf-32"),
                b"\xff\xfe\xfd" + text.encode(),
                text.encode()[: max(1, len(text) // 2)],
                text.encode() + b" trailing",
                b"{/* a comment */}",
                b"{'single': 'quotes'}",
            ]
        )
        c.json = None

    def query(c: Call) -> None:
        choice = rng.randrange(5)
        if choice == 0 and c.query:
            c.query = c.query + [(c.query[0][0], rng.choice(["", "1.2", "%ff"]))]
        elif choice == 1:
            c.query = [
                (k, rng.choice(["", "%00", "%ff%fe", "%zz", "%", "1.2%2F..", "x" * 9000]))
                for k, _ in c.query
            ] or [("study", "%00")]
        elif choice == 2:
            c.query = [
                (k, rng.choice(["nan", "inf", "-inf", "1e400", "0x10", "-1", "9" * 25, "1_0"]))
                for k in [*(k for k, _ in c.query), "hours", "generation"]
            ]
        elif choice == 3:
            c.query = c.query + [("=", "="), ("&", ""), ("unknown", "1")]
        else:
            c.query = [("a" * 5000, "b")]

    def path(c: Call) -> None:
        parts = c.path.split("/")
        numeric = [i for i, p in enumerate(parts) if p.isdigit()]
        choice = rng.randrange(4)
        if numeric and choice < 2:
            i = rng.choice(numeric)
            parts[i] = rng.choice(
                ["0", "007", "9" * 18, "9" * 19, "9" * 30, "-1", "1.0", "%31", "%D9%A3", "\xb3"]
            )
            c.path = "/".join(parts)
        elif choice == 2:
            c.path = rng.choice([c.path + "/", c.path.replace("/", "//"), c.path.upper()])
        else:
            c.path = rng.choice([c.path.replace("/", "%2F"), c.path + "/..", "/../" + c.path])

    def method(c: Call) -> None:
        c.method = rng.choice(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])

    def media_type(c: Call) -> None:
        c.content_type = rng.choice(
            [None, "", "text/plain", "application/x-www-form-urlencoded", "application/json; x"]
        )

    def length(c: Call) -> None:
        body = c.body()
        choice = rng.random()
        if body and choice < 0.4:
            c.raw = body[: rng.randrange(len(body))]  # the client sent less than it said
            c.length_delta = len(body) - len(c.raw)
        elif choice < 0.7:
            c.length_delta = rng.choice([None, -1, 1 << 21])
        else:  # '\xb2' and '\xb9' are digits to str.isdigit, not to int()
            c.length_text = rng.choice([b"\xb2", b"1\xb9", b"+5", b"0x10", b"1 2", b""])

    def authorization(c: Call) -> None:
        c.authorization = rng.choice(
            [
                b"",
                b"Bearer",
                b"Bearer " + b"x" * 5000,
                b"Bearer " + c.token.encode()[:-1],
                b"Basic !!!",
                b"Basic " + b"\xff" * 8,
                b"Basic Og==",  # ":" (no user, no password)
                b"Negotiate abc",
                b"bearer " + c.token.encode(),
            ]
        )

    return [
        value,
        keys,
        not_an_object,
        query,
        path,
        method,
        media_type,
        length,
        authorization,
    ]


def corpus(seed: int, count: int, ctx: dict[str, Any]) -> list[tuple[bytes, list[str]]]:
    """``count`` calls (raw bytes, what was done)."""
    rng = random.Random(seed)
    calls = valid_calls(ctx)
    mutations = _mutations(rng)
    out = []
    for k in range(count):
        make = calls[k % len(calls)]
        call = make(rng)
        call.token = ctx["token"]
        call.done.append(f"{call.method} {call.path}")
        mutate(rng, mutations, k, call)
        out.append((call.encode(), call.done))
    return out
