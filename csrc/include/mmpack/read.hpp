// Positioned reads of rows from files straight into memory, each row hashed
// right after it lands, while it is still in cache. No memory map: a mapped
// file that another process truncates kills the reader with SIGBUS, while a
// read that finds the file shorter only returns fewer bytes, reported here.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mmpack/copy.hpp"

namespace mmpack {

// `count` rows of `row_bytes` bytes each, back to back at position `offset`
// of the open file `fd` and back to back at `dst` in memory.
struct FileRun {
    int fd;
    std::uint64_t offset;
    std::byte* dst;
    std::uint64_t row_bytes;
    std::uint64_t count;
};

// How a read ended. `run` is the run being read when it stopped, `position`
// the file position where it stopped (end_of_file: the file's end as found),
// `wanted_end` the position the read wanted to reach, `error` the errno of
// an os_error.
struct ReadOutcome {
    enum class Status { ok, end_of_file, os_error };
    Status status = Status::ok;
    std::size_t run = 0;
    std::uint64_t position = 0;
    std::uint64_t wanted_end = 0;
    int error = 0;
};

// Reads every run (destinations must not overlap one another; the caller has
// checked that each lies inside its buffer and that offset + bytes fits an
// off_t). With SegmentOp::xor_into the file bytes are read into a per-thread
// scratch buffer and XORed into the destination. When `hashes` is not null,
// it receives the XXH3-64 of every row's destination bytes after the
// operation, rows numbered in run order (as many entries as the counts sum
// to). Runs are split across threads by bytes, rows kept whole; consecutive
// runs that follow each other in one file are read by one preadv(2), and no
// read exceeds 256 KiB unless a single row does, so hashing finds the rows in
// cache. Interrupted and partial reads are resumed. A failure stops the
// reads (destination bytes read before it stay written) and is returned.
ReadOutcome read_runs(const FileRun* runs, std::size_t n_runs, std::uint64_t* hashes,
                      SegmentOp op = SegmentOp::copy);

// Reads `size` bytes at `position` of `fd` into `dst` on the calling thread,
// resuming interrupted and partial reads (run 0 in the outcome).
ReadOutcome read_exact(int fd, std::uint64_t position, std::byte* dst, std::uint64_t size) noexcept;

}  // namespace mmpack
