"""PHI-free logs by construction.

The node's own messages carry UIDs, AE titles and reasons, never attribute
values of a data set. Libraries are not so careful: pydicom's validation
warnings quote the value they read, and a false length (a SOP Instance UID
declared 0xFFFF bytes long) makes that "value" the following elements:
Institution Name, Patient's Name, Patient ID. So every record that reaches a
handler of the node's log, and every Python warning (routed into logging),
passes :class:`PhiFilter`, which replaces every quoted literal that is not a
UID or a number by its length, drops control characters, and cuts what is left
after an unbalanced quote. Tracebacks are scrubbed the same way. The same
:func:`scrub` is applied to job errors before they are stored and shown.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback

# A quoted literal as repr() and f-strings write them: '...', "...", b'...', with escapes.
# A quote followed by a letter or digit does not close it: f"'{name}'" with the name
# O'Brien^John is one literal, not 'O' and then the rest of the name in the clear.
_QUOTED = re.compile(
    r"""(?:(?<![A-Za-z0-9_])[bBrRuU]{1,2})?(?P<q>['"])"""
    r"""(?:(?!(?P=q)(?![A-Za-z0-9]))[^\\\n]|\\.)*(?P=q)(?![A-Za-z0-9])"""
)
# What a quoted literal may show: a UID (components without leading zeros, so not a
# date written 1980.01.01) or a short number. Digits with dashes (1980-01-01) or a
# longer number (a birth date 19800231, a numeric Patient ID) are values.
_HARMLESS = re.compile(
    r"^(?:(?=.{3,64}\Z)(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+|(?=.{0,4}\Z)[+-]?[0-9.]*(?:e[+-]?[0-9]+)?)\Z",
    re.IGNORECASE,
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MAX = 2000  # a longer message is cut: nothing the node logs needs more
# An apostrophe inside a word ("the run's frames", "doesn't") is not a quote. Taken for
# one, it cut the rest of the node's own reasons ("Mask Frame Numbers ... are outside
# the run<value dropped>"), in the log and in stored job errors. It is written as
# U+2019, which the rules below do not take for a quote: that can only join quotes,
# so a value quoted around it is still replaced whole, and a quote left unbalanced
# still cuts what follows it.
# After a digit too: "job 17's run", "run 1.2.3's instances" were cut the same way.
_APOSTROPHE = re.compile(r"(?<=[A-Za-z0-9])'(?=(?:s|t|re|ve|ll|d)\b)")


def _redact(match: re.Match[str]) -> str:
    text = match.group(0)
    inner = text[text.index(match.group("q")) + 1 : -1]
    if _HARMLESS.match(inner):
        return inner  # a UID or a number, unquoted: any quote left over is a stray one
    return f"<{len(inner)} chars>"


def scrub(text: str) -> str:
    """``text`` without quoted values, control characters, or anything after a stray quote."""
    text = _APOSTROPHE.sub("\u2019", text)
    text = _QUOTED.sub(_redact, text)
    text = _CONTROL.sub("", text)
    for quote in ("'", '"'):
        if quote in text:  # an unbalanced quote: a value that ran on (apostrophes included)
            text = text[: text.index(quote)] + "<value dropped>"
    return text if len(text) <= _MAX else text[:_MAX] + "<cut>"


# pydicom logs each decoder plugin's failure on a frame as an ERROR with its traceback
# (several a frame); the job's or command's reason names each plugin's message, and the
# input is the sender's fault, not the node's: a warning, without the traceback.
_DECODERS = "pydicom.pixels.decoders"
# pynetdicom reports a peer's mistakes that it answers itself (a PDU or a message it
# cannot decode, answered with an A-ABORT or a rejection; a peer gone silent) as errors
# of its upper layer, state machine and decoders, most with a traceback: 30 tracebacks
# for the 96 conversations of tests/dimse_faults.py, each an ERROR an operator's alert
# would take for the node's. The node logs each such association's end once, with its
# reason and the calling AE title (dicom_node.scp). They are warnings, without the
# traceback. So are its reports of a destination that cannot be reached (transport: the
# outbox logs each deferred delivery with its reason). Errors of pynetdicom's
# association and service classes (a handler that raised) stay errors.
_PEER = (
    "pynetdicom.transport",
    "pynetdicom.dul",
    "pynetdicom.fsm",
    "pynetdicom.dimse",
    "pynetdicom.pdu",
    "pynetdicom.acse",
    "pynetdicom.utils",
)


def _peer_mistake(record: logging.LogRecord) -> bool:
    if record.name.startswith((_DECODERS, *_PEER)):  # pynetdicom.pdu: pdu_items too
        return True
    return record.name == "pynetdicom.association" and str(record.msg).startswith(
        "Network timeout reached"  # a peer gone silent
    )


class PhiFilter(logging.Filter):
    """Rewrites each record's message and traceback through :func:`scrub`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING and _peer_mistake(record):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg = scrub(message)
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


FILTER = PhiFilter()


def install() -> None:
    """Route Python warnings into logging and put the filter on every root handler
    (idempotent); a process without handlers gets one on stderr."""
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not root.handlers:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        stderr.setLevel(logging.WARNING)
        root.addHandler(stderr)
    for handler in root.handlers:
        if FILTER not in handler.filters:
            handler.addFilter(FILTER)
