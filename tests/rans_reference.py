"""A decoder of format version 3 chunks written from docs/FORMAT.md alone, in plain Python.

It shares no code with the kernels: tests decode what the native encoder
wrote with it, so the spec, not the implementation, says what the bytes
mean. Slow (a few microseconds per value): for small chunks only.
"""

from __future__ import annotations

import struct

FLOAT, INTEGER, HALF = "float", "integer", "half"


class Corrupt(Exception):
    """The bytes break a rule of the spec."""


def layout_of(dtype_name: str) -> tuple[str, int]:
    """(layout, element width) of a dtype, by the spec's table."""
    widths = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 8, "complex64": 4,
              "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
              "float8_e4m3fn": 1, "float8_e5m2": 1}
    if dtype_name == "float16":
        return HALF, 2
    if dtype_name in ("float32", "float64", "bfloat16", "complex64", "complex128"):
        return FLOAT, widths[dtype_name]
    return INTEGER, widths[dtype_name]


def field_widths(layout: str, e: int) -> list[int]:
    if layout == FLOAT:
        return [12, 4] + [8] * (e - 2)
    return [8] * e


def fields_of(layout: str, e: int, v: int) -> list[int]:
    b = 8 * e
    if layout == FLOAT:
        return [(v >> (b - 13)) & 0xFFF, ((v >> (b - 1)) << 3) | ((v >> (b - 16)) & 7)] + [
            (v >> (b - 8 - 8 * f)) & 0xFF for f in range(2, e)
        ]
    if layout == HALF:
        return [(v >> 7) & 0xFF, ((v >> 15) << 7) | (v & 0x7F)]
    return [(v >> (b - 8 - 8 * f)) & 0xFF for f in range(e)]


def element_of(layout: str, e: int, fields: list[int]) -> int:
    """The inverse of fields_of: every field's bits put back where they came from."""
    b = 8 * e
    if layout == FLOAT:
        v = (fields[0] << (b - 13)) | ((fields[1] >> 3) << (b - 1)) | ((fields[1] & 7) << (b - 16))
        for f in range(2, e):
            v |= fields[f] << (b - 8 - 8 * f)
        return v
    if layout == HALF:
        return (fields[0] << 7) | ((fields[1] >> 7) << 15) | (fields[1] & 0x7F)
    v = 0
    for f in range(e):
        v |= fields[f] << (b - 8 - 8 * f)
    return v


class Bits:
    """An LSB-first bit stream."""

    def __init__(self, data: bytes):
        self.data, self.position = data, 0

    def read(self, m: int) -> int:
        value = 0
        for k in range(m):
            byte = self.position >> 3
            if byte >= len(self.data):
                raise Corrupt("a bit stream ends early")
            value |= ((self.data[byte] >> (self.position & 7)) & 1) << k
            self.position += 1
        return value

    def check_used_up(self) -> None:
        if (self.position + 7) // 8 != len(self.data):
            raise Corrupt("a bit stream has bytes left")
        for k in range(self.position, 8 * len(self.data)):
            if (self.data[k >> 3] >> (k & 7)) & 1:
                raise Corrupt("padding bits are not zero")


def parse_table_block(block: bytes, widths: list[int]) -> list[dict]:
    fields, at = [], 0
    for f, k in enumerate(widths):
        if at >= len(block):
            raise Corrupt("the table block ends early")
        mode = block[at]
        at += 1
        if mode == 0:
            fields.append({"mode": "raw"})
        elif mode == 1:
            (c,) = struct.unpack_from("<H", block, at)
            at += 2
            if c >= 1 << k:
                raise Corrupt("constant too wide")
            fields.append({"mode": "constant", "value": c})
        elif mode == 2:
            (count,) = struct.unpack_from("<H", block, at)
            at += 2
            if not 2 <= count <= 256:
                raise Corrupt("symbol count")
            symbols, lowest = [], 0
            for s in range(count):
                code, freq = struct.unpack_from("<HH", block, at)
                at += 4
                a, r = code & 0xFFF, code >> 12
                if freq < 1:
                    raise Corrupt("frequency 0")
                if r == 15:
                    if f != 0 or s != 0 or a != 0:
                        raise Corrupt("misplaced zero symbol")
                    symbols.append({"zero": True, "freq": freq})
                    continue
                if r > k or a >= 1 << k or a % (1 << r) or a + (1 << r) > 1 << k or a < lowest:
                    raise Corrupt("a symbol breaks the range rules")
                lowest = a + (1 << r)
                symbols.append({"zero": False, "a": a, "r": r, "freq": freq})
            if sum(s["freq"] for s in symbols) != 4096:
                raise Corrupt("frequencies do not sum to 4096")
            cum = 0
            for s in symbols:
                s["cum"] = cum
                cum += s["freq"]
            fields.append({"mode": "rans", "symbols": symbols})
        else:
            raise Corrupt("unknown mode")
    if at != len(block):
        raise Corrupt("bytes after the fields")
    return fields


def _rans_values(stream: bytes, bits: bytes, symbols: list[dict], count: int) -> list:
    raw = Bits(bits)
    if count == 0:
        if stream:
            raise Corrupt("a field without values has a rANS stream")
        raw.check_used_up()
        return []
    if len(stream) < 64 or len(stream) % 2:
        raise Corrupt("rANS stream length")
    states = list(struct.unpack_from("<16I", stream, 0))
    if any(x < 1 << 16 for x in states):
        raise Corrupt("a state below 2^16")
    words = struct.unpack_from(f"<{(len(stream) - 64) // 2}H", stream, 64)
    next_word, values = 0, []
    for i in range(count):
        lane = i % 16
        x = states[lane]
        slot = x % 4096
        s = next(s for s in symbols if s["cum"] <= slot < s["cum"] + s["freq"])
        x = s["freq"] * (x // 4096) + slot - s["cum"]
        if x < 1 << 16:
            if next_word >= len(words):
                raise Corrupt("the words run out")
            x = x * 65536 + words[next_word]
            next_word += 1
        states[lane] = x
        values.append(None if s["zero"] else s["a"] + raw.read(s["r"]))
    if any(x != 1 << 16 for x in states) or next_word != len(words):
        raise Corrupt("the states do not end at 2^16 or words are left")
    raw.check_used_up()
    return values


def decode_chunk(chunk: bytes, table: list[dict], layout: str, e: int, n: int) -> bytes:
    """The B = n * e raw bytes of a chunk of n elements."""
    widths = field_widths(layout, e)
    lengths, at = [], 0
    for field in table:
        for _ in range({"raw": 1, "constant": 0, "rans": 2}[field["mode"]]):
            lengths.append(struct.unpack_from("<I", chunk, at)[0])
            at += 4
    streams = []
    for length in lengths:
        if at + length > len(chunk):
            raise Corrupt("the directory points past the chunk")
        streams.append(chunk[at : at + length])
        at += length
    if at != len(chunk):
        raise Corrupt("bytes the directory does not account for")
    values, zero = [], [False] * n
    for f, field in enumerate(table):
        count = n if f == 0 else n - sum(zero)
        if field["mode"] == "constant":
            values.append([field["value"]] * count)
        elif field["mode"] == "raw":
            bits = Bits(streams.pop(0))
            values.append([bits.read(widths[f]) for _ in range(count)])
            bits.check_used_up()
        else:
            got = _rans_values(streams.pop(0), streams.pop(0), field["symbols"], count)
            if f == 0:
                zero = [v is None for v in got]
            values.append(got)
    out, k = bytearray(), 0
    for i in range(n):
        if zero[i]:
            out += bytes(e)
            continue
        v = element_of(layout, e, [values[0][i]] + [values[f][k] for f in range(1, e)])
        out += v.to_bytes(e, "little")
        k += 1
    return bytes(out)
