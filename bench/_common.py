"""The benchmark scripts share the package's timing helpers (mmpack.evaluation.timing)."""

from mmpack.evaluation.timing import (
    describe_machine,
    interleaved_medians,
    median_seconds,
    parse_args,
    prime_memory,
    print_table,
    remove,
    timed,
    work_dir,
)

__all__ = [
    "describe_machine",
    "interleaved_medians",
    "median_seconds",
    "parse_args",
    "prime_memory",
    "print_table",
    "remove",
    "timed",
    "work_dir",
]
