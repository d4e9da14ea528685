"""rollouts.jsonl: the schema and validation (`schema`), the record dataclass, crash-safe writer
and streaming readers (`io`), and the rows one training step writes (`rows`)."""

from opdcli.records.io import (
    RolloutRecord,
    RolloutWriter,
    is_truncation,
    partial_message,
    read_raw,
    read_records,
)
from opdcli.records.schema import (
    FLOAT_DECIMALS,
    LOGPROB_TOLERANCE,
    MAX_TOPK,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    validate_record,
)

__all__ = [
    "FLOAT_DECIMALS", "LOGPROB_TOLERANCE", "MAX_TOPK", "SCHEMA_NAME", "SCHEMA_VERSION", "RolloutRecord",
    "RolloutWriter", "is_truncation", "partial_message", "read_raw", "read_records", "validate_record",
]
