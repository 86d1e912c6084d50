"""One typed settings object, loaded from a TOML file plus ``DICOM_NODE_...`` environment
overrides, validated at start. A bad value fails with the key and what is allowed.

Environment overrides use ``__`` for nesting and JSON for non-strings, e.g.
``DICOM_NODE_PORT=11113``, ``DICOM_NODE_COMPLETION__QUIET_PERIOD_S=3``,
``DICOM_NODE_ALLOWED_CALLING_AETS='["ORTHANC"]'``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicom_node.errors import ConfigError

ENV_PREFIX = "DICOM_NODE_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}\Z")  # PS3.5 AE: no backslash, no control


def is_ae_title(value: str) -> bool:
    return bool(_AE_RE.match(value)) and bool(value.strip())


def _ae_title(value: str) -> str:
    if not is_ae_title(value):
        raise ValueError(
            "an AE title is 1-16 printable ASCII characters, not only spaces, no backslash"
        )
    return value.strip()


def _url(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError("a URL starting with http:// or https://")
    return value.rstrip("/")


AETitle = Annotated[str, AfterValidator(_ae_title)]
_TOKEN_NAME = r"^[A-Za-z0-9_.@-]{1,64}$"


def _sender_name(value: str) -> str:
    """A calling AE title, or an API token's name (a STOW-RS sender's)."""
    if re.match(_TOKEN_NAME, value):
        return value
    return _ae_title(value)


SenderName = Annotated[str, AfterValidator(_sender_name)]
Url = Annotated[str, AfterValidator(_url)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Strict(BaseModel):
    # No setting means infinity or NaN: a quiet_period_s = inf never completed a series
    # by its quiet period (TOML writes inf and nan, and 1e400 reads as inf).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CompletionSettings(Strict):
    quiet_period_s: float = Field(
        10.0, gt=0, description="idle time after which a multi-instance series is complete"
    )
    max_receiving_s: float = Field(
        3600.0,
        gt=0,
        description="a series still receiving this long after it began is complete all the "
        "same (a sender that never stops, or resends an instance in a loop, held it open "
        "for ever); an instance after that opens it again",
    )
    sweep_interval_s: float = Field(1.0, gt=0)


# Resident memory one job of each pipeline may use: a fixed part (MiB) and a part per
# decoded pixel of its run (bytes; rows x columns x frames x samples, summed over a
# series' instances; a volume's voxels), at most ``memory_limit_mib``. The per-pixel
# part is the growth of a whole job's peak (decode, compute, encode; a fresh process
# with torch loaded) that ``python -m bench.budget`` measured between a clinical run
# and one three to eight times as large, classical path (BENCHMARKS.md, "Budget"),
# plus a quarter (growth in bytes per pixel: dsa_av 22.9, dsa_ia 22.9, dsa_perfusion 12.6,
# xa_coronary 28.4, rotational_dla 16.2, minip 7.6). The fixed part keeps each budget
# at the clinical size what it was before the budgets grew with the run (the peak
# there, the example packages' included, plus a quarter and 512 MiB for a long-lived
# worker's packages and allocator slack: peaks in GB minip 0.72, dsa_av 2.38, dsa_ia
# 2.20, dsa_perfusion 1.24, xa_coronary 1.10, rotational_dla 2.83), rounded up to
# 256 MiB. Before, a fixed 2 GiB ended every 1024^2 x 90 coronary cine (3.05 GB).
DEFAULT_PIPELINE_MEMORY_MIB: dict[str, int] = {
    "minip": 1280,  # 1580 at 1024^2 x 30 (a fixed 1536 before)
    "dsa_av": 2816,  # 3686 at 1024^2 x 30 (a fixed 3584 before)
    "dsa_ia": 2560,  # 3430 at 1024^2 x 30 (a fixed 3328 before)
    "dsa_perfusion": 1792,  # 2272 at 1024^2 x 30 (a fixed 2048 before)
    "xa_coronary": 1280,  # 2090 at 512^2 x 90 (a fixed 2048 before)
    "rotational_dla": 1536,  # 4224 at 512^3 (a fixed 4096 before)
}
DEFAULT_PIPELINE_MEMORY_BYTES_PER_PIXEL: dict[str, float] = {
    "minip": 10.0,
    "dsa_av": 29.0,
    "dsa_ia": 29.0,
    "dsa_perfusion": 16.0,
    "xa_coronary": 36.0,
    "rotational_dla": 21.0,
}


# Wall time one job may take: ``job_timeout_s`` plus a part per million decoded pixels
# of its run, at most ``job_timeout_max_s``. The per-megapixel part is the growth of a
# whole job's CPU time that ``python -m bench.budget`` measured between a clinical run
# and one three to eight times as large, classical path (BENCHMARKS.md, "Budget";
# CPU seconds per million pixels: minip 0.006, dsa_av 0.22, dsa_ia 0.23, dsa_perfusion
# 0.08, xa_coronary 2.6, rotational_dla 2.7), times three, rounded up: CPU seconds are
# the wall time on one thread (concurrency as large as the cores), and a site's machine
# may be slower than the one measured. Before, a fixed 1800 s held for every run, though
# a 1024^2 x 300 coronary cine needs some 850 s of CPU and a 768^3 volume some 1200 s
# (a 512^3 volume took 1077 s at rotational_dla 1.3.0, docs/coronary_rotational.md).
DEFAULT_PIPELINE_SECONDS_PER_MEGAPIXEL: dict[str, float] = {
    "minip": 0.1,
    "dsa_av": 1.0,
    "dsa_ia": 1.0,
    "dsa_perfusion": 0.5,
    "xa_coronary": 8.0,
    "rotational_dla": 8.0,
}


def _budgets(value: dict[str, int]) -> dict[str, int]:
    for name, mib in value.items():
        if mib < 256:
            raise ValueError(f"pipeline_memory_mib.{name}: at least 256 MiB, got {mib}")
    return {**DEFAULT_PIPELINE_MEMORY_MIB, **value}


def _per_pixel(value: dict[str, float]) -> dict[str, float]:
    for name, size in value.items():
        if not 0 <= size <= 4096:
            raise ValueError(f"pipeline_memory_bytes_per_pixel.{name}: 0 to 4096 bytes, got {size}")
    return {**DEFAULT_PIPELINE_MEMORY_BYTES_PER_PIXEL, **value}


def _per_megapixel(value: dict[str, float]) -> dict[str, float]:
    for name, seconds in value.items():
        if not 0 <= seconds <= 3600:
            raise ValueError(f"pipeline_seconds_per_megapixel.{name}: 0 to 3600 s, got {seconds}")
    return {**DEFAULT_PIPELINE_SECONDS_PER_MEGAPIXEL, **value}


# The budget settings, shared by the node's [workers] and a scale-out worker's file.
PipelineBudgets = Annotated[dict[str, int], AfterValidator(_budgets)]
PipelineBytesPerPixel = Annotated[dict[str, float], AfterValidator(_per_pixel)]
PipelineSecondsPerMegapixel = Annotated[dict[str, float], AfterValidator(_per_megapixel)]
# Decoding's own time limit, the node's [workers] and a scale-out worker's alike: a
# decoder stuck on a codestream would otherwise hold its worker for the whole job's
# limit (1800 s at least), three times over. Decoding is the one step whose time
# depends on what the sender wrote rather than on the run's size: the pipelines compute
# on arrays the headers bound. Lossless JPEG 2000, the slowest codec here, decoded at
# 0.14 s per million pixels on this project's 2-core test machine (JPEG-LS 0.08, RLE
# 0.004), so 1 s is 7 times that, and the fixed part covers reading the files.
DecodeTimeoutS = Annotated[
    float,
    Field(
        gt=0,
        description="wall time decoding a job's run may take (reading its files and "
        "decompressing its pixel data): the fixed part; with decode_seconds_per_megapixel "
        "times its decoded pixels, and never more than the job's own time limit",
    ),
]
DecodeSecondsPerMegapixel = Annotated[
    float,
    Field(
        ge=0,
        le=3600,
        description="what each million decoded pixels of the run add to decoding's time "
        "limit, in seconds",
    ),
]
# The memory pool of the jobs running at once (sandbox.MemoryPool), the node's and a
# scale-out worker's alike.
JobsMemoryMib = Annotated[
    int | None,
    Field(
        ge=256,
        description="resident memory the jobs running at once may hold together: each "
        "reserves its budget for its run once its headers are read and waits, before it "
        "decodes, until that fits beside the others' (a job larger than this runs alone); "
        "none: three quarters of this machine's memory (or its cgroup's limit)",
    ),
]


class WorkerSettings(Strict):
    concurrency: int = Field(1, ge=1, le=64)
    cpu_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="CPU threads one job may use (torch's threads, and the thread pools of "
        "the pipelines that size theirs from it); none: the CPUs the node may run on "
        "divided by concurrency, at least 1",
    )
    max_attempts: int = Field(3, ge=1, le=100)
    backoff_base_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)
    lease_s: float = Field(
        900.0, gt=0, description="a running job whose lease expires is taken again"
    )
    poll_interval_s: float = Field(0.5, gt=0)
    live_window_h: float = Field(
        24.0,
        ge=0,
        description="a run acquired longer ago than this (its header's acquisition, series, "
        "study or content date and time) is an older run, re-sent or retrieved: its jobs "
        "wait while any job of a live run is queued, so a bulk resend does not hold up the "
        "suites' runs; a run without a readable date is live; 0: every run in order of "
        "arrival",
    )
    memory_limit_mib: int = Field(
        16384,
        ge=256,
        description="resident memory of one job's worker process; above it the job is ended "
        "(the ceiling of every pipeline's budget, and the limit of pipelines without one)",
    )
    jobs_memory_mib: JobsMemoryMib = None
    job_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="wall time of one job attempt: the fixed part; with "
        "pipeline_seconds_per_megapixel times its run's decoded pixels, at most "
        "job_timeout_max_s",
    )
    job_timeout_max_s: float = Field(
        7200.0,
        gt=0,
        description="the longest one job attempt may take, however large its run (never "
        "less than job_timeout_s)",
    )
    decode_timeout_s: DecodeTimeoutS = 120.0
    decode_seconds_per_megapixel: DecodeSecondsPerMegapixel = 1.0
    pipeline_seconds_per_megapixel: PipelineSecondsPerMegapixel = Field(
        default_factory=lambda: dict(DEFAULT_PIPELINE_SECONDS_PER_MEGAPIXEL),
        description="what each million decoded pixels of the run (rows x columns x frames "
        "x samples; a volume's voxels) add to a job's time limit, in seconds; pipelines "
        "not named keep their measured defaults",
    )
    pipeline_memory_mib: PipelineBudgets = Field(
        default_factory=lambda: dict(DEFAULT_PIPELINE_MEMORY_MIB),
        description="the fixed part of the resident memory one job of a pipeline may use; "
        "with pipeline_memory_bytes_per_pixel times its run's decoded pixels, at most "
        "memory_limit_mib; pipelines not named keep their measured defaults",
    )
    pipeline_memory_bytes_per_pixel: PipelineBytesPerPixel = Field(
        default_factory=lambda: dict(DEFAULT_PIPELINE_MEMORY_BYTES_PER_PIXEL),
        description="what each decoded pixel of the run (rows x columns x frames x "
        "samples; a volume's voxels) adds to a job's budget, in bytes; pipelines not "
        "named keep their measured defaults",
    )
    pipeline_options: dict[str, dict[str, Any]] = Field(
        {},
        description="options per pipeline, given to it as PipelineContext.options (e.g. "
        "dsa_perfusion's ica_site_rules); the pipeline checks them on every job",
    )


class LimitsSettings(Strict):
    """What an instance may declare before anything is decoded (decompression bombs)."""

    max_rows: int = Field(8192, ge=1)
    max_columns: int = Field(8192, ge=1)
    max_frames: int = Field(5000, ge=1)
    max_decoded_bytes: int = Field(
        2 * 2**30, ge=1, description="Rows x Columns x Frames x Samples x Bits Allocated / 8"
    )
    max_inflated_bytes: int = Field(
        512 * 2**20,
        ge=1,
        description="a deflated data set once inflated (it is inflated in memory: pydicom "
        "reads deflated data sets whole)",
    )
    max_header_bytes: int = Field(
        16 * 2**20,
        ge=2**20,
        description="bytes the header check may read from a data set; values over 64 KiB "
        "are skipped, not read, so this bounds the elements a header may hold",
    )
    max_received_bytes: int = Field(
        2 * 2**30 + 64 * 2**20,
        ge=1,
        description="one C-STORE as it arrives; past it the association is aborted",
    )


class OutboxSettings(Strict):
    backoff_base_s: float = Field(2.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)
    timeout_s: float = Field(30.0, gt=0)
    max_aborts: int = Field(
        8,
        ge=1,
        description="an object in flight each time a destination ended the association "
        "(or answered HTTP 500) fails, with the reason, after this many times with other "
        "objects stored there in between: the destination does not take it (a destination "
        "that takes nothing keeps everything pending)",
    )


class RetentionSettings(Strict):
    """When a processed run's received files and results are deleted. A run is
    processed when it is settled (routed, unrouted or unroutable), none of its jobs is
    queued or running and none of its results waits for delivery; its index rows
    (states, reasons, notes) are kept."""

    keep_days: float | None = Field(
        14.0,
        ge=0,
        description="a processed run's files go this long after its last activity "
        "(None: kept until space runs short)",
    )
    free_target_bytes: int | None = Field(
        1 * 2**30,
        ge=0,
        description="below this free space, processed runs go oldest first, whatever "
        "their age, until it is free again (None: never)",
    )
    interval_s: float = Field(300.0, gt=0, description="how often to look")
    reserve_bytes: int = Field(
        16 * 2**20,
        ge=0,
        description="a file of this size kept next to the index and deleted when the "
        "disk is full, so that the index can commit the purges that free it (0: none)",
    )


Scope = Literal["read", "operate", "store", "worker"]


class ApiToken(Strict):
    """A bearer token, stored as its SHA-256 (``dicom-node token`` makes one)."""

    name: str = Field(pattern=_TOKEN_NAME, description="who, in the audit trail")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the token")
    scopes: list[Scope] = Field(min_length=1)


def host_share(given: int | None, places: int, whole: int) -> int | None:
    """What one IP address may hold of ``whole`` connections (DICOM associations, or
    the API's): ``given``, or half of ``places``; None when that is all of them (the
    node's own limit then answers), and by default under four places: a client that
    ends a connection and opens the next at once may find the first still counted for
    a moment, so a share of one would refuse it now and then."""
    if given is not None:
        share = given
    elif places >= 4:
        share = places // 2
    else:
        return None
    return share if share < whole else None


class ApiSettings(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8780
    tokens: list[ApiToken] = []
    tokens_file: Path | None = Field(
        None, description="more tokens, one a line: name sha256 scope[,scope...]"
    )
    max_body_bytes: int = Field(16 * 2**30, ge=1, description="a STOW-RS request body")
    max_part_bytes: int = Field(2**30, ge=1, description="one STOW-RS part (one instance)")
    max_parts: int = Field(
        10000, ge=1, description="parts (instances) in one STOW-RS request; 413 past it"
    )
    read_timeout_s: float = Field(60.0, gt=0, description="a client silent this long is dropped")
    max_concurrent_requests: int = Field(16, ge=1, le=1024)
    max_connections_per_host: int | None = Field(
        None,
        ge=1,
        le=2048,
        description="open connections from one IP address (each serves one request at a "
        "time); None: half of max_concurrent_requests (none under four), so that one "
        "host cannot take every place",
    )

    @property
    def host_share(self) -> int | None:
        """The connections one IP address may hold open (``host_share``)."""
        return host_share(
            self.max_connections_per_host,
            self.max_concurrent_requests,
            2 * self.max_concurrent_requests,
        )


def _readable_files(settings: BaseModel, keys: tuple[str, ...], where: str) -> None:
    """Raise ValueError naming ``where`` and the key for a path given that is not a file."""
    for key in keys:
        path = getattr(settings, key)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{where}{key}: {path} is not a readable file")


class TlsSettings(Strict):
    """TLS for the DICOM port and/or the REST API; ``ca_file`` requires client certificates."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = Field(
        None, description="set: clients must present a certificate it signed (mutual TLS)"
    )
    dicom: bool = False
    api: bool = False

    @model_validator(mode="after")
    def _files(self) -> TlsSettings:
        if not (self.dicom or self.api):
            return self
        for key in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, key)
            if path is None and key != "ca_file":
                raise ValueError(f"tls.{key} is needed when tls.dicom or tls.api is on")
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls.{key}: {path} is not a readable file")
        return self


class AuditSettings(Strict):
    """JSON lines in ``storage_dir/audit/``, rotated; optionally to syslog as well."""

    enabled: bool = True
    max_bytes: int = Field(16 * 2**20, ge=4096, description="rotate the file past this size")
    backup_count: int = Field(20, ge=1, le=1000)
    syslog: str | None = Field(
        None,
        pattern=r"^(/\S+|(udp|tcp)://[^\s:/]+:\d{1,5})$",
        description="/dev/log or udp://host:514",
    )


class EngineSettings(Strict):
    """Who runs the jobs: worker processes of this node (``embedded``, the default), or
    ``dicom-node worker`` processes on any machine, orchestrated by Temporal."""

    kind: Literal["embedded", "temporal"] = "embedded"
    address: str = Field(
        "127.0.0.1:7233", pattern=r"^[^\s/]+:\d{1,5}$", description="Temporal frontend host:port"
    )
    namespace: str = Field("default", min_length=1)
    task_queue: str = Field(
        "angio-jobs", min_length=1, description="where job activities go; a worker polls one"
    )
    queues: dict[str, Annotated[str, Field(min_length=1)]] = Field(
        {}, description="pipeline name -> task queue (e.g. the deep models on 'gpu')"
    )
    node_task_queue: str | None = Field(
        None, description="this node's workflows (default angio-node-<its index id>)"
    )
    heartbeat_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a worker silent this long has lost its job (retried)"
    )
    max_input_bytes: int = Field(
        256 * 2**10,
        ge=2**10,
        le=2 * 2**20,
        description="the largest workflow input the node starts (Temporal refuses payloads "
        "over 2 MB and warns over 512 KB); a run whose list of instances makes it larger "
        "goes without the list, which its worker asks the node for",
    )
    tls: bool = Field(False, description="TLS to the Temporal frontend")
    tls_ca_file: Path | None = Field(None, description="its CA (default: the system's roots)")
    tls_cert_file: Path | None = Field(None, description="a client certificate (mutual TLS)")
    tls_key_file: Path | None = None
    tls_server_name: str | None = Field(None, description="the name its certificate carries")

    @model_validator(mode="after")
    def _tls_files(self) -> EngineSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("engine.tls_cert_file and engine.tls_key_file go together")
        _readable_files(self, ("tls_ca_file", "tls_cert_file", "tls_key_file"), "engine.")
        return self

    def queue_for(self, pipeline: str) -> str:
        return self.queues.get(pipeline, self.task_queue)


class DimseDestination(Strict):
    kind: Literal["dimse"] = "dimse"
    name: str
    host: str
    port: Port
    ae_title: AETitle
    tls: bool = Field(False, description="DICOM over TLS (PS3.15 B.1) to this destination")
    tls_ca_file: Path | None = Field(
        None, description="the CA its certificate must chain to (default: the system's roots)"
    )
    tls_cert_file: Path | None = Field(None, description="the node's certificate (mutual TLS)")
    tls_key_file: Path | None = None
    tls_server_name: str | None = Field(
        None, description="the name its certificate carries (default: host)"
    )
    storage_commitment: bool = Field(
        False,
        description="ask it to commit to each result it stored (Storage Commitment Push "
        "Model; it reports to the node's AE): a result's files are kept until it did, one "
        "it did not commit to is sent again",
    )

    @model_validator(mode="after")
    def _tls_files(self) -> DimseDestination:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(f"destination {self.name}: tls_cert_file and tls_key_file go together")
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name"):
            if getattr(self, key) is not None and not self.tls:
                raise ValueError(f"destination {self.name}: {key} is set but tls is off")
        keys = ("tls_ca_file", "tls_cert_file", "tls_key_file")
        _readable_files(self, keys, f"destination {self.name}: ")
        return self


SECRET_KEYS = ("password", "bearer_token")


class DicomwebDestination(Strict):
    kind: Literal["dicomweb"] = "dicomweb"
    name: str
    url: Url = Field(description="DICOMweb base URL; STOW-RS posts to {url}/studies")
    username: str | None = None
    # Secrets: given here, or read from ``<key>_file`` or the environment variable ``<key>_env``.
    password: str | None = Field(None, repr=False)
    bearer_token: str | None = Field(None, repr=False)
    password_file: Path | None = None
    password_env: str | None = None
    bearer_token_file: Path | None = None
    bearer_token_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _secrets(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in SECRET_KEYS:
            path, env = data.get(f"{key}_file"), data.get(f"{key}_env")
            if data.get(key) is None and path:
                try:
                    data[key] = Path(path).read_text().strip()
                except OSError as exc:
                    raise ValueError(f"{key}_file: cannot read {path}: {exc.strerror}") from None
            if data.get(key) is None and env:
                if env not in os.environ:
                    raise ValueError(f"{key}_env: the environment variable {env} is not set")
                data[key] = os.environ[env]
        return data


Destination = Annotated[DimseDestination | DicomwebDestination, Field(discriminator="kind")]


class CommitmentSettings(Strict):
    """Storage commitment (PS3.4 J, Push Model) as SCP: a sender that asks whether the
    node holds what it sent is answered on a new association to its address here."""

    report_to: list[DimseDestination] = Field(
        [],
        description="where each sender that requests storage commitment takes its "
        "results (N-EVENT-REPORT): its AE title, host and port (and TLS); a request "
        "from an AE title not listed is refused (0x0124)",
    )
    max_instances: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="instances one request may list (more: 0x0213; its data set, held in "
        "memory, past 160 bytes an instance: the connection is closed)",
    )
    max_listed_per_sender: int = Field(
        500_000,
        ge=1,
        description="instances the index keeps listed in one sender's requests: past it, "
        "its oldest reported requests are forgotten; a request while those not yet "
        "reported list more is refused (0x0213)",
    )
    give_up_h: float = Field(
        24.0,
        gt=0,
        description="a result its sender has not taken (its address down, or refusing) "
        "in this long is given up, with the reason in the index and the log; so is a "
        "result the node sent to a destination that commits and that has not committed "
        "to it in this long (its files may then go)",
    )
    wait_s: float = Field(
        600.0,
        gt=0,
        description="a destination that commits and has not reported in this long after "
        "it was asked is asked again",
    )
    max_failures: int = Field(
        3,
        ge=1,
        description="a result a destination did not commit to is sent again, and fails "
        "at this many such answers",
    )

    @model_validator(mode="after")
    def _one_address_each(self) -> CommitmentSettings:
        titles = [p.ae_title for p in self.report_to]
        if _twice(titles):
            raise ValueError(
                "storage_commitment.report_to: one address per AE title: "
                f"{sorted(set(_twice(titles)))} listed twice"
            )
        return self

    def address_of(self, ae_title: str) -> DimseDestination | None:
        return next((p for p in self.report_to if p.ae_title == ae_title), None)


class TagPattern(Strict):
    regex: str

    @model_validator(mode="after")
    def _compiles(self) -> TagPattern:
        try:
            re.compile(self.regex)
        except re.error as exc:
            raise ValueError(f"invalid regex {self.regex!r}: {exc}") from None
        return self


def _sop_classes(values: list[str]) -> list[str]:
    """Each a SOP Class UID or pydicom's keyword of one: a keyword the dictionary does
    not hold made every run ``unroutable`` ("header cannot be read for routing"),
    blaming the sender's header for the rule's typo."""
    from dicom_node.sopclasses import UID_RE, resolve_sop_class

    for value in values:
        try:
            resolved = resolve_sop_class(value)
        except ValueError as exc:
            raise ValueError(f"{exc}{_close(value, _sop_class_keywords())}") from None
        if len(resolved) > 64 or not UID_RE.fullmatch(resolved):
            # the spool's rule (spool.check_uid): no instance it stores has another
            raise ValueError(f"{value!r} is not a UID (digits and dots, at most 64 characters)")
    return values


def _sop_class_keywords() -> list[str]:
    from pydicom.uid import UID_dictionary

    return [entry[4] for entry in UID_dictionary.values() if entry[1] == "SOP Class"]


def _close(word: str, choices: Iterable[str]) -> str:
    import difflib

    near = difflib.get_close_matches(word, list(choices), n=3)
    return f" (did you mean {', '.join(near)}?)" if near else ""


# Values that cannot be matched as text: a sequence's items, binary data (and the
# Pixel Data, which routing never reads).
_UNMATCHABLE_VRS = {"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"}


def _tag_keywords(tags: dict[str, Any]) -> dict[str, Any]:
    """Each key a DICOM keyword whose value is text or numbers: pydicom answers an
    unknown one as absent, so a rule with a mistyped keyword never matched, without a
    word (and the router logged pydicom's warning at every run)."""
    from pydicom.datadict import dictionary_VR, keyword_dict

    for keyword in tags:
        if keyword not in keyword_dict:
            raise ValueError(f"{keyword!r} is not a DICOM keyword{_close(keyword, keyword_dict)}")
        vr = dictionary_VR(keyword_dict[keyword])
        if vr in _UNMATCHABLE_VRS:
            raise ValueError(f"{keyword} ({vr}) cannot be matched as text")
    return tags


def _modalities(values: list[str]) -> list[str]:
    """Modality (0008,0060) is a code string, compared as it is: ``xa`` never matched
    a run's ``XA``."""
    for value in values:
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", value):
            raise ValueError(
                f"{value!r} is not a Modality code (upper case letters, digits, _, at most "
                f"16: {value.strip().upper()[:16]!r}?)"
            )
    return values


class Match(Strict):
    """Every condition given must hold. Lists mean 'any of'; ``image_type`` means 'all of'."""

    sop_class_uid: Annotated[list[str], AfterValidator(_sop_classes)] = []
    modality: Annotated[list[str], AfterValidator(_modalities)] = []
    image_type: list[str] = []
    not_image_type: list[str] = []
    calling_aet: list[AETitle] = []
    subtracted: bool | None = None
    is_volume: bool | None = None
    frame_rate_min: float | None = Field(None, ge=0)
    frame_rate_max: float | None = Field(None, gt=0)
    min_frames: int | None = Field(None, ge=1)
    tags: Annotated[dict[str, str | list[str] | TagPattern], AfterValidator(_tag_keywords)] = {}

    @model_validator(mode="after")
    def _frame_rates(self) -> Match:
        low, high = self.frame_rate_min, self.frame_rate_max
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"frame_rate_min {low:g} is above frame_rate_max {high:g}: no run matches"
            )
        return self


def _twice(values: list[str]) -> list[str]:
    return [v for v in values if values.count(v) > 1]


def _distinct(values: list[str]) -> list[str]:
    """A name given twice: a rule's pipeline listed twice made two jobs of it for every
    run, computing the same results twice."""
    twice = sorted(set(_twice(values)))
    if twice:
        raise ValueError(f"named more than once: {', '.join(twice)}")
    return values


class Rule(Strict):
    name: str = Field(min_length=1)
    match: Match = Match()
    pipelines: Annotated[list[str], AfterValidator(_distinct)] = []
    # Destination names, or ["*"] for every configured destination.
    destinations: Annotated[list[str], AfterValidator(_distinct)] = ["*"]


class Settings(Strict):
    ae_title: AETitle = "ANGIO_NODE"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    storage_dir: Path = Path("var")
    allowed_calling_aets: list[AETitle] = []
    min_free_bytes: int = Field(
        256 * 2**20, ge=0, description="refuse instances below this free space"
    )
    sender_reserve_share: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="the last share of the storage disk (above min_free_bytes) is kept "
        "for the senders whose runs not yet processed hold less than it: one that holds "
        "more is refused (0xA700) there until the node catches up; 0: none kept",
    )
    forwarders: list[SenderName] = Field(
        [],
        description="senders that forward other senders' instances and name them (an "
        "Orthanc with the angio plugin, a router): the calling AE titles whose C-STOREs' "
        "Move Originator AE Title, and the STOW-RS senders (API token names) whose "
        "requests' X-Angio-Sender header, names the sender the node takes turns and "
        "keeps the disk's reserve by; from anyone else both are ignored",
    )
    max_uid_length: int = 64
    completion: CompletionSettings = CompletionSettings()
    limits: LimitsSettings = LimitsSettings()
    workers: WorkerSettings = WorkerSettings()
    outbox: OutboxSettings = OutboxSettings()
    api: ApiSettings = ApiSettings()
    tls: TlsSettings = TlsSettings()
    audit: AuditSettings = AuditSettings()
    engine: EngineSettings = EngineSettings()
    retention: RetentionSettings = RetentionSettings()
    storage_commitment: CommitmentSettings = CommitmentSettings()
    max_associations: int = Field(32, ge=1, le=1024, description="concurrent DICOM associations")
    max_associations_per_host: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="concurrent DICOM associations (or connections not yet associated) "
        "from one IP address; None: half of max_associations (none under four), so that "
        "one host cannot take every place",
    )
    network_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a DICOM peer silent this long is dropped; so is one whose PDU or "
        "message arrives more slowly than 16 KiB/s beyond it",
    )
    destinations: list[Destination] = []
    # Model package folder per pipeline name; a pipeline without one uses its classical path.
    models: dict[str, Path] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    rules: list[Rule] | None = Field(None, description="None means the built-in default rules")

    @model_validator(mode="after")
    def _references(self) -> Settings:
        if (
            self.api.enabled
            and not (self.api.tokens or self.api.tokens_file)
            and not is_loopback(self.api.host)
        ):
            raise ValueError(
                f"api.host {self.api.host} is reachable from the network but no API token is "
                "configured: add [[api.tokens]] (dicom-node token makes one) or api.tokens_file, "
                "or bind the API to 127.0.0.1"
            )
        if self.engine.kind == "temporal" and not self.api.enabled:
            raise ValueError(
                "engine.kind = temporal needs the REST API (api.enabled): workers fetch runs "
                "and return results through it"
            )
        names = [d.name for d in self.destinations]
        if _twice(names):
            raise ValueError(f"destination names must be unique: {sorted(set(_twice(names)))}")
        if "*" in names:
            raise ValueError("a destination cannot be named '*': a rule's '*' means all of them")
        committing = {
            d.ae_title
            for d in self.destinations
            if isinstance(d, DimseDestination) and d.storage_commitment
        }
        for callers, who in (
            (committing, "destinations with storage_commitment report to the node"),
            (
                {p.ae_title for p in self.storage_commitment.report_to},
                "storage_commitment.report_to lists senders that call the node",
            ),
        ):
            refused = sorted(callers - set(self.allowed_calling_aets))
            if self.allowed_calling_aets and refused:
                # rejected at association: their reports (or requests) would never come
                raise ValueError(
                    f"{who} as {refused}, which allowed_calling_aets refuses: add them to it"
                )
        rules = [rule.name for rule in self.rules or []]
        if _twice(rules):
            # the status, the job notes and route --explain name a run's rule
            raise ValueError(f"rule names must be unique: {sorted(set(_twice(rules)))}")
        for i, rule in enumerate(self.rules or []):
            for dest in rule.destinations:
                if dest != "*" and dest not in names:
                    raise ValueError(
                        f"rules[{i}] ({rule.name}) names destination {dest!r}; configured: {names or 'none'}"
                    )
        return self

    def destinations_for(self, rule: Rule) -> list[Destination]:
        if "*" in rule.destinations:
            return list(self.destinations)
        return [d for d in self.destinations if d.name in rule.destinations]

    @property
    def host_share(self) -> int | None:
        """The associations one IP address may hold at once (``host_share``)."""
        return host_share(
            self.max_associations_per_host, self.max_associations, self.max_associations
        )

    @property
    def db_path(self) -> Path:
        return self.storage_dir / "node.sqlite"


def is_loopback(host: str) -> bool:
    """Only loopback addresses (and ``localhost``) may serve the API without tokens."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _masked(value: Any) -> Any:
    """An invalid input as it may be printed: secrets replaced (a config error is logged)."""
    if isinstance(value, dict):
        return {k: "***" if k in SECRET_KEYS else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"{msg}"
        if not e["loc"]:  # a check across keys: the message names them
            lines.append(f"  {msg}")
            continue
        secret = str(e["loc"][-1]) in SECRET_KEYS
        lines.append(f"  {key}: {msg} (got {'***' if secret else _masked(e.get('input'))!r})")
    return "invalid settings:\n" + "\n".join(lines)


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Settings from ``path`` (TOML), then the environment, then ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        if isinstance(data.get("models"), dict):  # package folders: relative to this file
            data["models"] = {
                k: str(p.resolve().parent / v) if isinstance(v, str) else v
                for k, v in data["models"].items()
            }
    _merge(data, _env_overrides(os.environ if environ is None else environ))
    _merge(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    _check_pipelines(settings)
    return settings


def check_pipeline_keys(
    keyed: Iterable[tuple[str, Iterable[str]]], known: set[str] | None = None
) -> None:
    """Settings keyed by pipeline name (the setting's name, its keys): every key must
    name a pipeline (``known``: the installed ones when not given)."""
    if known is None:
        import pipelines

        known = set(pipelines.names())
    for key, names in keyed:
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"invalid settings:\n  {key}.{name}: unknown pipeline "
                    f"(allowed: {', '.join(sorted(known))})"
                )


def _check_pipelines(settings: Settings) -> None:
    import pipelines

    known = set(pipelines.names())
    for i, rule in enumerate(settings.rules or []):  # the default rules use known names
        for name in rule.pipelines:
            if name not in known:
                raise ConfigError(
                    f"invalid settings:\n  rules.{i}.pipelines: unknown pipeline {name!r} "
                    f"(allowed: {', '.join(sorted(known))})"
                )
    check_pipeline_keys(
        (
            ("engine.queues", settings.engine.queues),
            ("workers.pipeline_memory_mib", settings.workers.pipeline_memory_mib),
            (
                "workers.pipeline_memory_bytes_per_pixel",
                settings.workers.pipeline_memory_bytes_per_pixel,
            ),
            (
                "workers.pipeline_seconds_per_megapixel",
                settings.workers.pipeline_seconds_per_megapixel,
            ),
            ("workers.pipeline_options", settings.workers.pipeline_options),
            ("models", settings.models),
        ),
        known,
    )
    _check_pipeline_options(settings)
    _check_models(settings)


def _check_models(settings: Settings) -> None:
    """Each ``[models]`` package as a worker reads it (``pipelines.models.manifest``): its
    files, its package.json (format, pipeline) and its weights' SHA-256, so that a
    package that cannot be used stops the start instead of failing every job of its
    pipeline (only the declared pipeline was checked: a missing metrics.json, a format
    the node does not read or a corrupt weights.pt failed each job)."""
    from pipelines.base import PipelineError
    from pipelines.models.manifest import read_manifest, verified_weights

    for name, pkg in settings.models.items():
        if not Path(pkg).is_dir():
            raise ConfigError(
                f"invalid settings:\n  models.{name}: {pkg} is not a model package folder"
            )
        try:
            meta, _, _ = read_manifest(pkg, name)
            verified_weights(pkg, str(meta.get("weights_sha256", "")))
        except PipelineError as exc:
            raise ConfigError(f"invalid settings:\n  models.{name}: {exc}") from None


def _check_pipeline_options(settings: Settings) -> None:
    """Each pipeline's options as the pipeline itself checks them (``pipelines.options``),
    now rather than on every job: a mistyped name or an unusable value failed every
    job of that pipeline (or was ignored without a word) while the node ran. Where the
    jobs go to Temporal, options that alone fill a workflow's input
    (``engine.max_input_bytes``) are refused too: no job of that pipeline could start."""
    from pipelines.base import PipelineError
    from pipelines.options import checked

    for name, options in settings.workers.pipeline_options.items():
        key = f"workers.pipeline_options.{name}"
        try:
            checked(name, options)
        except PipelineError as exc:
            raise ConfigError(f"invalid settings:\n  {key}: {exc}") from None
        size = len(json.dumps(options).encode())
        if settings.engine.kind == "temporal" and size >= settings.engine.max_input_bytes:
            raise ConfigError(
                f"invalid settings:\n  {key}: {size} bytes as a workflow input, past "
                f"engine.max_input_bytes ({settings.engine.max_input_bytes}): no job of "
                f"{name} could start"
            )
