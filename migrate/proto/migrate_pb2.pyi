from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtoVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTO_VERSION_UNSPECIFIED: _ClassVar[ProtoVersion]
    PROTO_VERSION: _ClassVar[ProtoVersion]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RAW: _ClassVar[Encoding]
    ZSTD: _ClassVar[Encoding]
PROTO_VERSION_UNSPECIFIED: ProtoVersion
PROTO_VERSION: ProtoVersion
RAW: Encoding
ZSTD: Encoding

class GuestSpec(_message.Message):
    __slots__ = ("size", "workload", "seed", "ops", "threads", "ops_per_sec", "page_size", "content", "kind")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    OPS_PER_SEC_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    size: int
    workload: str
    seed: int
    ops: int
    threads: int
    ops_per_sec: float
    page_size: int
    content: str
    kind: str
    def __init__(self, size: _Optional[int] = ..., workload: _Optional[str] = ..., seed: _Optional[int] = ..., ops: _Optional[int] = ..., threads: _Optional[int] = ..., ops_per_sec: _Optional[float] = ..., page_size: _Optional[int] = ..., content: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class GuestRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LaunchGuestRequest(_message.Message):
    __slots__ = ("name", "spec", "start_paused", "backing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    START_PAUSED_FIELD_NUMBER: _ClassVar[int]
    BACKING_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: GuestSpec
    start_paused: bool
    backing: str
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[GuestSpec, _Mapping]] = ..., start_paused: _Optional[bool] = ..., backing: _Optional[str] = ...) -> None: ...

class ProgressPoint(_message.Message):
    __slots__ = ("t_ns", "ops")
    T_NS_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    t_ns: int
    ops: int
    def __init__(self, t_ns: _Optional[int] = ..., ops: _Optional[int] = ...) -> None: ...

class GuestInfo(_message.Message):
    __slots__ = ("name", "spec", "state", "pid", "page_count", "page_size", "ops_done", "finished", "kind", "run_id", "progress", "first_op_ns", "last_op_ns", "vcpu_blocked_ms", "guest_digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPS_DONE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FIRST_OP_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_OP_NS_FIELD_NUMBER: _ClassVar[int]
    VCPU_BLOCKED_MS_FIELD_NUMBER: _ClassVar[int]
    GUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: GuestSpec
    state: str
    pid: int
    page_count: int
    page_size: int
    ops_done: int
    finished: bool
    kind: str
    run_id: str
    progress: _containers.RepeatedCompositeFieldContainer[ProgressPoint]
    first_op_ns: int
    last_op_ns: int
    vcpu_blocked_ms: _containers.RepeatedScalarFieldContainer[float]
    guest_digest: str
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[GuestSpec, _Mapping]] = ..., state: _Optional[str] = ..., pid: _Optional[int] = ..., page_count: _Optional[int] = ..., page_size: _Optional[int] = ..., ops_done: _Optional[int] = ..., finished: _Optional[bool] = ..., kind: _Optional[str] = ..., run_id: _Optional[str] = ..., progress: _Optional[_Iterable[_Union[ProgressPoint, _Mapping]]] = ..., first_op_ns: _Optional[int] = ..., last_op_ns: _Optional[int] = ..., vcpu_blocked_ms: _Optional[_Iterable[float]] = ..., guest_digest: _Optional[str] = ...) -> None: ...

class ListGuestsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGuestsReply(_message.Message):
    __slots__ = ("guests",)
    GUESTS_FIELD_NUMBER: _ClassVar[int]
    guests: _containers.RepeatedCompositeFieldContainer[GuestInfo]
    def __init__(self, guests: _Optional[_Iterable[_Union[GuestInfo, _Mapping]]] = ...) -> None: ...

class DigestReply(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("proto_version", "roles", "software")
    PROTO_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_FIELD_NUMBER: _ClassVar[int]
    proto_version: int
    roles: _containers.RepeatedScalarFieldContainer[str]
    software: str
    def __init__(self, proto_version: _Optional[int] = ..., roles: _Optional[_Iterable[str]] = ..., software: _Optional[str] = ...) -> None: ...

class RunRef(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class WaitIncomingRequest(_message.Message):
    __slots__ = ("run_id", "wait_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    wait_s: float
    def __init__(self, run_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class PrepareOutgoingRequest(_message.Message):
    __slots__ = ("name", "track_writes", "data_plane")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRACK_WRITES_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    name: str
    track_writes: bool
    data_plane: str
    def __init__(self, name: _Optional[str] = ..., track_writes: _Optional[bool] = ..., data_plane: _Optional[str] = ...) -> None: ...

class PrepareOutgoingReply(_message.Message):
    __slots__ = ("run_id", "bulk_endpoint", "spec", "page_count", "tracking_error", "data_endpoint", "data_key")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BULK_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRACKING_ERROR_FIELD_NUMBER: _ClassVar[int]
    DATA_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DATA_KEY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    bulk_endpoint: str
    spec: GuestSpec
    page_count: int
    tracking_error: str
    data_endpoint: str
    data_key: bytes
    def __init__(self, run_id: _Optional[str] = ..., bulk_endpoint: _Optional[str] = ..., spec: _Optional[_Union[GuestSpec, _Mapping]] = ..., page_count: _Optional[int] = ..., tracking_error: _Optional[str] = ..., data_endpoint: _Optional[str] = ..., data_key: _Optional[bytes] = ...) -> None: ...

class DirtySet(_message.Message):
    __slots__ = ("bitmap", "pages", "scan_ms")
    BITMAP_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    SCAN_MS_FIELD_NUMBER: _ClassVar[int]
    bitmap: bytes
    pages: int
    scan_ms: float
    def __init__(self, bitmap: _Optional[bytes] = ..., pages: _Optional[int] = ..., scan_ms: _Optional[float] = ...) -> None: ...

class SwitchoverReply(_message.Message):
    __slots__ = ("state_json", "last_op_ns", "pause_ms", "dirty", "sent_ns")
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    LAST_OP_NS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    DIRTY_FIELD_NUMBER: _ClassVar[int]
    SENT_NS_FIELD_NUMBER: _ClassVar[int]
    state_json: bytes
    last_op_ns: int
    pause_ms: float
    dirty: DirtySet
    sent_ns: int
    def __init__(self, state_json: _Optional[bytes] = ..., last_op_ns: _Optional[int] = ..., pause_ms: _Optional[float] = ..., dirty: _Optional[_Union[DirtySet, _Mapping]] = ..., sent_ns: _Optional[int] = ...) -> None: ...

class SourceStats(_message.Message):
    __slots__ = ("urgent_requests", "urgent_pages", "urgent_bytes", "bulk_pages", "bulk_bytes", "bulk_compressed_batches")
    URGENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    URGENT_PAGES_FIELD_NUMBER: _ClassVar[int]
    URGENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BULK_PAGES_FIELD_NUMBER: _ClassVar[int]
    BULK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BULK_COMPRESSED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    urgent_requests: int
    urgent_pages: int
    urgent_bytes: int
    bulk_pages: int
    bulk_bytes: int
    bulk_compressed_batches: int
    def __init__(self, urgent_requests: _Optional[int] = ..., urgent_pages: _Optional[int] = ..., urgent_bytes: _Optional[int] = ..., bulk_pages: _Optional[int] = ..., bulk_bytes: _Optional[int] = ..., bulk_compressed_batches: _Optional[int] = ...) -> None: ...

class PrepareIncomingRequest(_message.Message):
    __slots__ = ("run_id", "name", "spec", "source_endpoint", "bulk_endpoint", "mode", "recovery_timeout_s", "data_plane", "data_endpoint", "data_key", "fault_path", "policy", "working_set", "record_ws")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BULK_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    DATA_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DATA_KEY_FIELD_NUMBER: _ClassVar[int]
    FAULT_PATH_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WORKING_SET_FIELD_NUMBER: _ClassVar[int]
    RECORD_WS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    spec: GuestSpec
    source_endpoint: str
    bulk_endpoint: str
    mode: str
    recovery_timeout_s: float
    data_plane: str
    data_endpoint: str
    data_key: bytes
    fault_path: str
    policy: str
    working_set: bytes
    record_ws: bool
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., spec: _Optional[_Union[GuestSpec, _Mapping]] = ..., source_endpoint: _Optional[str] = ..., bulk_endpoint: _Optional[str] = ..., mode: _Optional[str] = ..., recovery_timeout_s: _Optional[float] = ..., data_plane: _Optional[str] = ..., data_endpoint: _Optional[str] = ..., data_key: _Optional[bytes] = ..., fault_path: _Optional[str] = ..., policy: _Optional[str] = ..., working_set: _Optional[bytes] = ..., record_ws: _Optional[bool] = ...) -> None: ...

class PrepareIncomingReply(_message.Message):
    __slots__ = ("prepare_ms",)
    PREPARE_MS_FIELD_NUMBER: _ClassVar[int]
    prepare_ms: float
    def __init__(self, prepare_ms: _Optional[float] = ...) -> None: ...

class StartIncomingRequest(_message.Message):
    __slots__ = ("run_id", "state_json", "no_push", "max_bandwidth", "discard")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    NO_PUSH_FIELD_NUMBER: _ClassVar[int]
    MAX_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    DISCARD_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state_json: bytes
    no_push: bool
    max_bandwidth: int
    discard: bytes
    def __init__(self, run_id: _Optional[str] = ..., state_json: _Optional[bytes] = ..., no_push: _Optional[bool] = ..., max_bandwidth: _Optional[int] = ..., discard: _Optional[bytes] = ...) -> None: ...

class StartIncomingReply(_message.Message):
    __slots__ = ("resume_ms", "discard_ms", "discarded", "received_ns")
    RESUME_MS_FIELD_NUMBER: _ClassVar[int]
    DISCARD_MS_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_NS_FIELD_NUMBER: _ClassVar[int]
    resume_ms: float
    discard_ms: float
    discarded: int
    received_ns: int
    def __init__(self, resume_ms: _Optional[float] = ..., discard_ms: _Optional[float] = ..., discarded: _Optional[int] = ..., received_ns: _Optional[int] = ...) -> None: ...

class PrecopyRoundRequest(_message.Message):
    __slots__ = ("run_id", "discard", "pull", "max_bandwidth", "deadline_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DISCARD_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    MAX_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    discard: bytes
    pull: bool
    max_bandwidth: int
    deadline_s: float
    def __init__(self, run_id: _Optional[str] = ..., discard: _Optional[bytes] = ..., pull: _Optional[bool] = ..., max_bandwidth: _Optional[int] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class PrecopyRoundReply(_message.Message):
    __slots__ = ("discarded", "discard_ms", "pages", "zero", "bytes_wire", "seconds", "missing")
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    DISCARD_MS_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    ZERO_FIELD_NUMBER: _ClassVar[int]
    BYTES_WIRE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    discarded: int
    discard_ms: float
    pages: int
    zero: int
    bytes_wire: int
    seconds: float
    missing: int
    def __init__(self, discarded: _Optional[int] = ..., discard_ms: _Optional[float] = ..., pages: _Optional[int] = ..., zero: _Optional[int] = ..., bytes_wire: _Optional[int] = ..., seconds: _Optional[float] = ..., missing: _Optional[int] = ...) -> None: ...

class MigrationStatus(_message.Message):
    __slots__ = ("run_id", "phase", "error", "pages_total", "pages_received", "pages_pushed", "pages_faulted", "pages_zero", "faults", "bytes_wire", "bytes_pages", "elapsed_s", "detail_json", "data_plane", "fault_path", "pages_recovered", "pages_before_resume", "pages_prefetched", "prefetch_hits", "policy", "working_set")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PAGES_PUSHED_FIELD_NUMBER: _ClassVar[int]
    PAGES_FAULTED_FIELD_NUMBER: _ClassVar[int]
    PAGES_ZERO_FIELD_NUMBER: _ClassVar[int]
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_WIRE_FIELD_NUMBER: _ClassVar[int]
    BYTES_PAGES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    FAULT_PATH_FIELD_NUMBER: _ClassVar[int]
    PAGES_RECOVERED_FIELD_NUMBER: _ClassVar[int]
    PAGES_BEFORE_RESUME_FIELD_NUMBER: _ClassVar[int]
    PAGES_PREFETCHED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_HITS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WORKING_SET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    phase: str
    error: str
    pages_total: int
    pages_received: int
    pages_pushed: int
    pages_faulted: int
    pages_zero: int
    faults: int
    bytes_wire: int
    bytes_pages: int
    elapsed_s: float
    detail_json: str
    data_plane: str
    fault_path: str
    pages_recovered: int
    pages_before_resume: int
    pages_prefetched: int
    prefetch_hits: int
    policy: str
    working_set: bytes
    def __init__(self, run_id: _Optional[str] = ..., phase: _Optional[str] = ..., error: _Optional[str] = ..., pages_total: _Optional[int] = ..., pages_received: _Optional[int] = ..., pages_pushed: _Optional[int] = ..., pages_faulted: _Optional[int] = ..., pages_zero: _Optional[int] = ..., faults: _Optional[int] = ..., bytes_wire: _Optional[int] = ..., bytes_pages: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., detail_json: _Optional[str] = ..., data_plane: _Optional[str] = ..., fault_path: _Optional[str] = ..., pages_recovered: _Optional[int] = ..., pages_before_resume: _Optional[int] = ..., pages_prefetched: _Optional[int] = ..., prefetch_hits: _Optional[int] = ..., policy: _Optional[str] = ..., working_set: _Optional[bytes] = ...) -> None: ...

class CapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CapacityReply(_message.Message):
    __slots__ = ("available", "promised", "outstanding", "limit", "headroom", "free", "guests")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PROMISED_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    GUESTS_FIELD_NUMBER: _ClassVar[int]
    available: int
    promised: int
    outstanding: int
    limit: int
    headroom: int
    free: int
    guests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, available: _Optional[int] = ..., promised: _Optional[int] = ..., outstanding: _Optional[int] = ..., limit: _Optional[int] = ..., headroom: _Optional[int] = ..., free: _Optional[int] = ..., guests: _Optional[_Iterable[str]] = ...) -> None: ...

class SetBandwidthRequest(_message.Message):
    __slots__ = ("run_id", "max_bandwidth")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    max_bandwidth: int
    def __init__(self, run_id: _Optional[str] = ..., max_bandwidth: _Optional[int] = ...) -> None: ...

class SetBandwidthReply(_message.Message):
    __slots__ = ("max_bandwidth",)
    MAX_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    max_bandwidth: int
    def __init__(self, max_bandwidth: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("name", "file")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    name: str
    file: str
    def __init__(self, name: _Optional[str] = ..., file: _Optional[str] = ...) -> None: ...

class SnapshotProgress(_message.Message):
    __slots__ = ("guest", "file", "phase", "error", "pages_total", "pages_saved", "pages_streamed", "pages_faulted", "wp_faults", "waited", "blocked_ms", "max_blocked_ms", "bytes_written", "elapsed_s", "downtime_ms", "ops_at_snapshot", "ops_now", "ops_per_s_before")
    GUEST_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_SAVED_FIELD_NUMBER: _ClassVar[int]
    PAGES_STREAMED_FIELD_NUMBER: _ClassVar[int]
    PAGES_FAULTED_FIELD_NUMBER: _ClassVar[int]
    WP_FAULTS_FIELD_NUMBER: _ClassVar[int]
    WAITED_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKED_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    OPS_AT_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    OPS_NOW_FIELD_NUMBER: _ClassVar[int]
    OPS_PER_S_BEFORE_FIELD_NUMBER: _ClassVar[int]
    guest: str
    file: str
    phase: str
    error: str
    pages_total: int
    pages_saved: int
    pages_streamed: int
    pages_faulted: int
    wp_faults: int
    waited: int
    blocked_ms: float
    max_blocked_ms: float
    bytes_written: int
    elapsed_s: float
    downtime_ms: float
    ops_at_snapshot: int
    ops_now: int
    ops_per_s_before: float
    def __init__(self, guest: _Optional[str] = ..., file: _Optional[str] = ..., phase: _Optional[str] = ..., error: _Optional[str] = ..., pages_total: _Optional[int] = ..., pages_saved: _Optional[int] = ..., pages_streamed: _Optional[int] = ..., pages_faulted: _Optional[int] = ..., wp_faults: _Optional[int] = ..., waited: _Optional[int] = ..., blocked_ms: _Optional[float] = ..., max_blocked_ms: _Optional[float] = ..., bytes_written: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., downtime_ms: _Optional[float] = ..., ops_at_snapshot: _Optional[int] = ..., ops_now: _Optional[int] = ..., ops_per_s_before: _Optional[float] = ...) -> None: ...

class LoadSnapshotRequest(_message.Message):
    __slots__ = ("name", "file")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    name: str
    file: str
    def __init__(self, name: _Optional[str] = ..., file: _Optional[str] = ...) -> None: ...

class PageRequest(_message.Message):
    __slots__ = ("run_id", "req_id", "first_page", "count")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    req_id: int
    first_page: int
    count: int
    def __init__(self, run_id: _Optional[str] = ..., req_id: _Optional[int] = ..., first_page: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class PageRun(_message.Message):
    __slots__ = ("first_page", "count")
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    first_page: int
    count: int
    def __init__(self, first_page: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class BulkRequest(_message.Message):
    __slots__ = ("run_id", "first_page", "count", "req_id", "runs")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    first_page: int
    count: int
    req_id: int
    runs: _containers.RepeatedCompositeFieldContainer[PageRun]
    def __init__(self, run_id: _Optional[str] = ..., first_page: _Optional[int] = ..., count: _Optional[int] = ..., req_id: _Optional[int] = ..., runs: _Optional[_Iterable[_Union[PageRun, _Mapping]]] = ...) -> None: ...

class PageBatch(_message.Message):
    __slots__ = ("req_id", "first_page", "count", "zero_runs", "encoding", "data", "raw_len", "checksum")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ZERO_RUNS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RAW_LEN_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    req_id: int
    first_page: int
    count: int
    zero_runs: _containers.RepeatedScalarFieldContainer[int]
    encoding: Encoding
    data: bytes
    raw_len: int
    checksum: int
    def __init__(self, req_id: _Optional[int] = ..., first_page: _Optional[int] = ..., count: _Optional[int] = ..., zero_runs: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., data: _Optional[bytes] = ..., raw_len: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class PageBatches(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[PageBatch]
    def __init__(self, batches: _Optional[_Iterable[_Union[PageBatch, _Mapping]]] = ...) -> None: ...
