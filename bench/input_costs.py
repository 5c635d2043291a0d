"""The Python CPU a request's Struct costs at the value budget, and what a Struct far past it
costs to refuse: `python -m bench.input_costs`. Thread CPU, best of --repeat runs, so other
load on the machine moves it little."""

import argparse
import contextlib
import time
from collections.abc import Callable

from google.protobuf import struct_pb2

from services.runtime.errors import InvalidArgument
from services.runtime.fields import MAX_STRUCT_VALUES, struct_dict

# The hostile Struct of the noisy-neighbour issue: under 1 MB on the wire.
HOSTILE_VALUES = 240_000


def _struct(value: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def _shapes(values: int) -> dict[str, struct_pb2.Struct]:
    """Structs of about `values` values in the shapes that cost most per value."""
    return {
        "empty lists": _struct({"l": [[] for _ in range(values - 1)]}),
        "objects {a: 1}": _struct({"l": [{"a": 1} for _ in range((values - 1) // 2)]}),
        "keys to short strings": _struct({f"k{i}": "value" for i in range(values)}),
        "numbers": _struct({"l": list(range(values - 1))}),
    }


def _cpu_ms(convert: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.thread_time()
        with contextlib.suppress(InvalidArgument):
            convert()
        best = min(best, time.thread_time() - started)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.input_costs", description=__doc__)
    parser.add_argument("--repeat", type=int, default=15, help="runs per row (best counts)")
    repeat = parser.parse_args().repeat
    for shape, message in _shapes(MAX_STRUCT_VALUES).items():
        ms = _cpu_ms(lambda m=message: struct_dict(m, "job.data"), repeat)
        print(f"{ms:8.2f} ms  job.data at {MAX_STRUCT_VALUES:,} values: {shape}")
    hostile = _struct({"l": [[] for _ in range(HOSTILE_VALUES)]})
    ms = _cpu_ms(lambda: struct_dict(hostile, "job.data"), repeat)
    print(
        f"{ms:8.2f} ms  job.data of {HOSTILE_VALUES:,} empty lists "
        f"({hostile.ByteSize():,} bytes): refused"
    )


if __name__ == "__main__":
    main()
