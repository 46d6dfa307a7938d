from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ...) -> None: ...

class Distribution(_message.Message):
    __slots__ = ("token_ids", "probs_f16")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_F16_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs_f16: bytes
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs_f16: _Optional[bytes] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("prompt_ids", "client_tag", "owner")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TAG_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    client_tag: str
    owner: str
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., client_tag: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    length: int
    def __init__(self, session_id: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("session_id", "expected_length", "length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    expected_length: int
    length: int
    def __init__(self, session_id: _Optional[str] = ..., expected_length: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("owner",)
    OWNER_FIELD_NUMBER: _ClassVar[int]
    owner: str
    def __init__(self, owner: _Optional[str] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "model_path", "vocab_size", "eos_token_id", "pad_token_id", "decoder_start_token_id", "tokenizer_fingerprint", "dtype", "quantization_bits", "num_parameters", "role", "limits", "live_sessions", "cached_tokens", "metrics", "blas", "draft_method", "tensor_parallel", "load_seconds", "device", "hostname", "kv_bits", "kv_group_size", "cache_bytes_used", "cache_bytes_per_position", "typical_session_bytes", "typical_sessions_free")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DECODER_START_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_BITS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BLAS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_METHOD_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    KV_BITS_FIELD_NUMBER: _ClassVar[int]
    KV_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_SESSION_BYTES_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_SESSIONS_FREE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_path: str
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    decoder_start_token_id: int
    tokenizer_fingerprint: str
    dtype: str
    quantization_bits: int
    num_parameters: int
    role: str
    limits: Limits
    live_sessions: int
    cached_tokens: int
    metrics: Metrics
    blas: str
    draft_method: str
    tensor_parallel: int
    load_seconds: float
    device: str
    hostname: str
    kv_bits: int
    kv_group_size: int
    cache_bytes_used: int
    cache_bytes_per_position: int
    typical_session_bytes: int
    typical_sessions_free: int
    def __init__(self, model_id: _Optional[str] = ..., model_path: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., pad_token_id: _Optional[int] = ..., decoder_start_token_id: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., quantization_bits: _Optional[int] = ..., num_parameters: _Optional[int] = ..., role: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., live_sessions: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ..., blas: _Optional[str] = ..., draft_method: _Optional[str] = ..., tensor_parallel: _Optional[int] = ..., load_seconds: _Optional[float] = ..., device: _Optional[str] = ..., hostname: _Optional[str] = ..., kv_bits: _Optional[int] = ..., kv_group_size: _Optional[int] = ..., cache_bytes_used: _Optional[int] = ..., cache_bytes_per_position: _Optional[int] = ..., typical_session_bytes: _Optional[int] = ..., typical_sessions_free: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sessions", "max_prompt_tokens", "max_draft", "session_ttl_s", "max_batch", "batch_wait_ms", "max_decoder_tokens", "owner_lease_s", "cache_memory_bytes")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OWNER_LEASE_S_FIELD_NUMBER: _ClassVar[int]
    CACHE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_prompt_tokens: int
    max_draft: int
    session_ttl_s: float
    max_batch: int
    batch_wait_ms: float
    max_decoder_tokens: int
    owner_lease_s: float
    cache_memory_bytes: int
    def __init__(self, max_sessions: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_draft: _Optional[int] = ..., session_ttl_s: _Optional[float] = ..., max_batch: _Optional[int] = ..., batch_wait_ms: _Optional[float] = ..., max_decoder_tokens: _Optional[int] = ..., owner_lease_s: _Optional[float] = ..., cache_memory_bytes: _Optional[int] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("sessions_opened", "sessions_expired", "forward_passes", "steps", "response_bytes", "request_bytes", "batches", "batched_steps", "sessions_reclaimed")
    SESSIONS_OPENED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    sessions_opened: int
    sessions_expired: int
    forward_passes: int
    steps: int
    response_bytes: int
    request_bytes: int
    batches: int
    batched_steps: int
    sessions_reclaimed: int
    def __init__(self, sessions_opened: _Optional[int] = ..., sessions_expired: _Optional[int] = ..., forward_passes: _Optional[int] = ..., steps: _Optional[int] = ..., response_bytes: _Optional[int] = ..., request_bytes: _Optional[int] = ..., batches: _Optional[int] = ..., batched_steps: _Optional[int] = ..., sessions_reclaimed: _Optional[int] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("session_id", "expected_length", "rollback_to", "append_tokens", "num_draft", "sampling", "seed", "timeout_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_TO_FIELD_NUMBER: _ClassVar[int]
    APPEND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    expected_length: int
    rollback_to: int
    append_tokens: _containers.RepeatedScalarFieldContainer[int]
    num_draft: int
    sampling: SamplingParams
    seed: int
    timeout_ms: float
    def __init__(self, session_id: _Optional[str] = ..., expected_length: _Optional[int] = ..., rollback_to: _Optional[int] = ..., append_tokens: _Optional[_Iterable[int]] = ..., num_draft: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., timeout_ms: _Optional[float] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("tokens", "token_probs", "distributions", "length", "model_ms", "batch_size")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_PROBS_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    token_probs: _containers.RepeatedScalarFieldContainer[float]
    distributions: _containers.RepeatedCompositeFieldContainer[Distribution]
    length: int
    model_ms: float
    batch_size: int
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., token_probs: _Optional[_Iterable[float]] = ..., distributions: _Optional[_Iterable[_Union[Distribution, _Mapping]]] = ..., length: _Optional[int] = ..., model_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("session_id", "expected_length", "rollback_to", "append_tokens", "num_draft", "sampling", "seed", "draft_distributions", "timeout_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_TO_FIELD_NUMBER: _ClassVar[int]
    APPEND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    expected_length: int
    rollback_to: int
    append_tokens: _containers.RepeatedScalarFieldContainer[int]
    num_draft: int
    sampling: SamplingParams
    seed: int
    draft_distributions: _containers.RepeatedCompositeFieldContainer[Distribution]
    timeout_ms: float
    def __init__(self, session_id: _Optional[str] = ..., expected_length: _Optional[int] = ..., rollback_to: _Optional[int] = ..., append_tokens: _Optional[_Iterable[int]] = ..., num_draft: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., draft_distributions: _Optional[_Iterable[_Union[Distribution, _Mapping]]] = ..., timeout_ms: _Optional[float] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("argmax", "draft_probs", "resampled", "length", "model_ms", "batch_size", "batch_rows")
    ARGMAX_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    RESAMPLED_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    argmax: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: _containers.RepeatedScalarFieldContainer[float]
    resampled: _containers.RepeatedScalarFieldContainer[int]
    length: int
    model_ms: float
    batch_size: int
    batch_rows: int
    def __init__(self, argmax: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Iterable[float]] = ..., resampled: _Optional[_Iterable[int]] = ..., length: _Optional[int] = ..., model_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., batch_rows: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "num_draft", "num_draft_auto", "temperature", "top_k", "top_p", "delta", "seed", "speculative", "pipeline", "text_spans")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_AUTO_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    TEXT_SPANS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    num_draft: int
    num_draft_auto: bool
    temperature: float
    top_k: int
    top_p: float
    delta: float
    seed: int
    speculative: bool
    pipeline: bool
    text_spans: bool
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., num_draft: _Optional[int] = ..., num_draft_auto: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., delta: _Optional[float] = ..., seed: _Optional[int] = ..., speculative: _Optional[bool] = ..., pipeline: _Optional[bool] = ..., text_spans: _Optional[bool] = ...) -> None: ...

class TextSpan(_message.Message):
    __slots__ = ("text", "from_draft")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FROM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    text: str
    from_draft: bool
    def __init__(self, text: _Optional[str] = ..., from_draft: _Optional[bool] = ...) -> None: ...

class GenerateStats(_message.Message):
    __slots__ = ("proposed", "accepted", "acceptance_rate", "target_passes", "draft_passes", "steps", "draft_ms", "verify_ms", "orchestration_ms", "total_ms", "tokens", "target_tokens", "final_num_draft", "seed", "draft_replica", "target_replica", "wire_bytes", "accepted_per_position", "proposed_per_position", "time_to_first_token_ms", "draft_model_ms", "target_model_ms", "failovers", "steps_per_num_draft", "predrafts", "predraft_hits", "wasted_draft_tokens")
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_PASSES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PASSES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    ORCHESTRATION_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINAL_NUM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_REPLICA_FIELD_NUMBER: _ClassVar[int]
    TARGET_REPLICA_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MODEL_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_MS_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_NUM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    PREDRAFTS_FIELD_NUMBER: _ClassVar[int]
    PREDRAFT_HITS_FIELD_NUMBER: _ClassVar[int]
    WASTED_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    proposed: int
    accepted: int
    acceptance_rate: float
    target_passes: int
    draft_passes: int
    steps: int
    draft_ms: float
    verify_ms: float
    orchestration_ms: float
    total_ms: float
    tokens: int
    target_tokens: int
    final_num_draft: int
    seed: int
    draft_replica: str
    target_replica: str
    wire_bytes: int
    accepted_per_position: _containers.RepeatedScalarFieldContainer[int]
    proposed_per_position: _containers.RepeatedScalarFieldContainer[int]
    time_to_first_token_ms: float
    draft_model_ms: float
    target_model_ms: float
    failovers: int
    steps_per_num_draft: _containers.RepeatedScalarFieldContainer[int]
    predrafts: int
    predraft_hits: int
    wasted_draft_tokens: int
    def __init__(self, proposed: _Optional[int] = ..., accepted: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., target_passes: _Optional[int] = ..., draft_passes: _Optional[int] = ..., steps: _Optional[int] = ..., draft_ms: _Optional[float] = ..., verify_ms: _Optional[float] = ..., orchestration_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., tokens: _Optional[int] = ..., target_tokens: _Optional[int] = ..., final_num_draft: _Optional[int] = ..., seed: _Optional[int] = ..., draft_replica: _Optional[str] = ..., target_replica: _Optional[str] = ..., wire_bytes: _Optional[int] = ..., accepted_per_position: _Optional[_Iterable[int]] = ..., proposed_per_position: _Optional[_Iterable[int]] = ..., time_to_first_token_ms: _Optional[float] = ..., draft_model_ms: _Optional[float] = ..., target_model_ms: _Optional[float] = ..., failovers: _Optional[int] = ..., steps_per_num_draft: _Optional[_Iterable[int]] = ..., predrafts: _Optional[int] = ..., predraft_hits: _Optional[int] = ..., wasted_draft_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "stats", "from_draft", "spans")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    FROM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    stats: GenerateStats
    from_draft: _containers.RepeatedScalarFieldContainer[bool]
    spans: _containers.RepeatedCompositeFieldContainer[TextSpan]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ..., from_draft: _Optional[_Iterable[bool]] = ..., spans: _Optional[_Iterable[_Union[TextSpan, _Mapping]]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "stats", "from_draft", "spans")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    FROM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    stats: GenerateStats
    from_draft: _containers.RepeatedScalarFieldContainer[bool]
    spans: _containers.RepeatedCompositeFieldContainer[TextSpan]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ..., from_draft: _Optional[_Iterable[bool]] = ..., spans: _Optional[_Iterable[_Union[TextSpan, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("address", "role", "healthy", "active_sessions", "last_error", "live_sessions", "steps_per_s", "kv_bits", "cache_bytes_used", "cache_memory_bytes", "typical_sessions_free", "batches", "batched_steps", "tokens", "draft_proposed", "draft_accepted")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    KV_BITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    CACHE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_SESSIONS_FREE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    address: str
    role: str
    healthy: bool
    active_sessions: int
    last_error: str
    live_sessions: int
    steps_per_s: float
    kv_bits: int
    cache_bytes_used: int
    cache_memory_bytes: int
    typical_sessions_free: int
    batches: int
    batched_steps: int
    tokens: int
    draft_proposed: int
    draft_accepted: int
    def __init__(self, address: _Optional[str] = ..., role: _Optional[str] = ..., healthy: _Optional[bool] = ..., active_sessions: _Optional[int] = ..., last_error: _Optional[str] = ..., live_sessions: _Optional[int] = ..., steps_per_s: _Optional[float] = ..., kv_bits: _Optional[int] = ..., cache_bytes_used: _Optional[int] = ..., cache_memory_bytes: _Optional[int] = ..., typical_sessions_free: _Optional[int] = ..., batches: _Optional[int] = ..., batched_steps: _Optional[int] = ..., tokens: _Optional[int] = ..., draft_proposed: _Optional[int] = ..., draft_accepted: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("replicas", "active_generations", "max_generations")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    active_generations: int
    max_generations: int
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., active_generations: _Optional[int] = ..., max_generations: _Optional[int] = ...) -> None: ...
