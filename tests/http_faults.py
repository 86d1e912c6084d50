"""A generated corpus of broken STOW-RS requests (tests/test_stow_faults.py).

Each request starts as a valid STOW-RS POST of one to three small XA instances
and gets one to three mutations drawn from what a broken or hostile HTTP client
sends: the request line and headers (method, path, version, header lines too long
or too many), the media type and its boundary, the body's framing (Content-Length
that lies, chunked coding with bad sizes or missing CRLFs, both at once, another
coding), the multipart structure (parts without their header end, a boundary
missing or inside a part, a long preamble, parts of other types, empty parts),
and the bytes themselves (flipped, cut short, CRLFs taken out). Each case says
what it did, so a failure names the mutations."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CRLF = b"\r\n"


@dataclass
class Request:
    """A raw HTTP request, built from its parts so that mutations can change any."""

    parts: list[bytes]
    boundary: bytes = b"b0und4ry"
    method: bytes = b"POST"
    path: bytes = b"/dicom-web/studies"
    version: bytes = b"HTTP/1.1"
    content_type: bytes | None = None  # None: multipart/related with the boundary
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    framing: str = "length"  # length, chunked, none
    length_delta: int = 0  # Content-Length minus the body's real length
    body: bytes | None = None  # None: the multipart body of ``parts``
    chunks: Callable[[bytes], bytes] | None = None  # how a chunked body is written
    done: list[str] = field(default_factory=list)  # the mutations, for the failure message

    def multipart(self) -> bytes:
        return (
            b"".join(
                b"--"
                + self.boundary
                + CRLF
                + b"Content-Type: application/dicom"
                + CRLF
                + CRLF
                + p
                + CRLF
                for p in self.parts
            )
            + b"--"
            + self.boundary
            + b"--"
            + CRLF
        )

    def encode(self) -> bytes:
        body = self.multipart() if self.body is None else self.body
        ctype = self.content_type
        if ctype is None:
            ctype = b'multipart/related; type="application/dicom"; boundary=' + self.boundary
        lines = [self.method + b" " + self.path + b" " + self.version, b"Host: node"]
        if ctype:
            lines.append(b"Content-Type: " + ctype)
        if self.framing == "length":
            lines.append(b"Content-Length: " + str(len(body) + self.length_delta).encode())
        elif self.framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
            body = (self.chunks or _chunked)(body)
        lines += [k + b": " + v for k, v in self.headers]
        return CRLF.join(lines) + CRLF + CRLF + body


def _chunked(body: bytes, size: int = 4096) -> bytes:
    out = b"".join(
        f"{len(body[i : i + size]):x}".encode() + CRLF + body[i : i + size] + CRLF
        for i in range(0, len(body), size)
    )
    return out + b"0" + CRLF + CRLF


def _mutations(rng: random.Random) -> list[Callable[[Request], None]]:
    def noise(most: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, most)))

    def method(r: Request) -> None:
        r.method = rng.choice([b"PUT", b"DELETE", b"PATCH", b"post", b"P\x00ST", noise(12)])

    def path(r: Request) -> None:
        r.path = rng.choice(
            [
                b"/dicom-web/studies/1.2.abc",
                b"/dicom-web/studies/" + b"1." * 40,
                b"/dicom-web/studies/../../etc",
                b"/dicom-web/studies/1.2.3",  # a target study the parts are not of
                b"/dicom-web//studies",
                b"/" + noise(40).replace(b" ", b"_").replace(b"\n", b"_"),
                b"/dicom-web/studies?" + b"x" * 5000,
            ]
        )

    def version(r: Request) -> None:
        r.version = rng.choice([b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 extra", b"HTCPCP/1.0", b""])

    def long_header(r: Request) -> None:
        r.headers.append((b"X-Long", b"a" * rng.choice([70_000, 200_000])))

    def many_headers(r: Request) -> None:
        r.headers += [(f"X-H{i}".encode(), b"v") for i in range(rng.choice([101, 500]))]

    def bad_header(r: Request) -> None:
        r.headers.append(rng.choice([(b"No colon here", b""), (noise(20), noise(20))]))

    def media_type(r: Request) -> None:
        r.content_type = rng.choice(
            [
                b"",
                b"application/dicom",
                b"multipart/related",
                b"multipart/related; boundary=",
                b'multipart/related; boundary=""',
                b"multipart/related; boundary=" + b"x" * 300,
                b"multipart/related; boundary*=utf-8''%FF%FE%00",
                b"multipart/related; boundary=other",
                b'multipart/related; type="application/dicom+json"; boundary=' + r.boundary,
                b"multipart/mixed; boundary=" + r.boundary,
                b"multipart/related; boundary=" + r.boundary + b"; boundary=second",
                noise(60).replace(b"\r", b"").replace(b"\n", b""),
            ]
        )

    def length(r: Request) -> None:
        choice = rng.randrange(6)
        if choice == 0:
            r.framing = "none"
        elif choice == 1:
            r.length_delta = rng.randrange(1, 5000)  # more than is sent: the body ends early
        elif choice == 2:
            r.length_delta = -rng.randrange(1, 200)  # less: the rest is another "request"
        elif choice == 3:
            r.framing = "none"
            r.headers.append((b"Content-Length", rng.choice([b"-5", b"abc", b"1e3", b"9" * 25])))
        elif choice == 4:
            r.headers.append((b"Content-Length", b"12"))  # a second, different length
        else:
            r.headers.append((b"Transfer-Encoding", rng.choice([b"chunked", b"gzip", b"x"])))

    def chunking(r: Request) -> None:
        r.framing = "chunked"
        kind = rng.randrange(5)

        def bad(body: bytes) -> bytes:
            good = _chunked(body, rng.choice([1, 7, 4096]))
            if kind == 0:
                return good.replace(b"\r\n", b"\n", rng.randrange(1, 4))
            if kind == 1:
                return b"zz" + CRLF + body
            if kind == 2:
                return f"{len(body) + 100:x}".encode() + CRLF + body  # longer than sent
            if kind == 3:
                return good[:-5]  # no last chunk
            return b"f" * 40 + CRLF + body

        r.chunks = bad if rng.random() < 0.8 else None

    def structure(r: Request) -> None:
        body = r.multipart()
        delimiter = b"--" + r.boundary
        kind = rng.randrange(9)
        if kind == 0:
            r.body = body.replace(CRLF + CRLF, CRLF, 1)  # a part without its header end
        elif kind == 1:
            r.body = body[: body.rfind(delimiter)]  # no close delimiter
        elif kind == 2:
            r.body = b"x" * 70_000 + body  # a preamble past what is searched
        elif kind == 3:
            r.body = body.replace(b"application/dicom", b"text/plain", 1)
        elif kind == 4:
            r.body = delimiter + CRLF + CRLF + CRLF + body  # an empty part first
        elif kind == 5:
            at = body.find(CRLF + CRLF) + 4 + rng.randrange(50, 400)
            r.body = body[:at] + CRLF + delimiter + CRLF + body[at:]  # a boundary inside
        elif kind == 6:
            r.body = delimiter + CRLF + b"Content-Type: application/dicom" + b"x" * 20_000
        elif kind == 7:
            r.body = body.replace(delimiter, delimiter.lower() + b"X")  # no boundary at all
        else:
            r.body = delimiter + b"--" + CRLF  # only the close delimiter: no part

    def flip(r: Request) -> None:
        body = bytearray(r.multipart() if r.body is None else r.body)
        for _ in range(rng.choice([1, 5, 50])):
            body[rng.randrange(len(body))] = rng.randrange(256)
        r.body = bytes(body)

    def cut(r: Request) -> None:
        body = r.multipart() if r.body is None else r.body
        r.body = body[: rng.randrange(len(body))]

    def no_crlf(r: Request) -> None:
        body = r.multipart() if r.body is None else r.body
        r.body = body.replace(CRLF, b"\n")

    return [
        method,
        path,
        version,
        long_header,
        many_headers,
        bad_header,
        media_type,
        length,
        chunking,
        structure,
        flip,
        cut,
        no_crlf,
    ]


def mutate(rng: random.Random, mutations: list[Callable[[Any], None]], k: int, target: Any) -> None:
    """Case ``k``'s mutations, each named in ``target.done``: every mutation at least once
    in the first rounds, then up to two more drawn."""
    chosen = [mutations[k % len(mutations)]] + rng.sample(mutations, rng.randrange(0, 3))
    for m in chosen:
        m(target)
        target.done.append(m.__name__)


def corpus(
    seed: int, count: int, instance: Callable[[int], bytes]
) -> list[tuple[bytes, list[str]]]:
    """``count`` requests (raw bytes, the mutations made); ``instance(k)`` is a valid
    DICOM file, a new instance for every k."""
    rng = random.Random(seed)
    mutations = _mutations(rng)
    out = []
    for k in range(count):
        request = Request(parts=[instance(1000 * k + i) for i in range(rng.randrange(1, 4))])
        mutate(rng, mutations, k, request)
        out.append((request.encode(), request.done))
    return out
