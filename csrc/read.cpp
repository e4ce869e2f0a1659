#include "mmpack/read.hpp"

#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "mmpack/parallel.hpp"
#include "mmpack/xxh3.hpp"

namespace mmpack {

namespace {

// Bytes one read moves at most (unless a single row is larger): small enough
// that the rows it brings are still in L2 when they are hashed, large enough
// that the system call costs little next to the copy.
constexpr std::uint64_t kBatchBytes = std::uint64_t{256} << 10;

// Bytes between two wanted pieces of one file that a read takes in (into the
// bounce buffer) rather than ending the batch: a system call costs about as
// much as copying this much out of the page cache.
constexpr std::uint64_t kMaxGapBytes = 4096;

// Pieces at least this large are read straight into their destination;
// smaller ones through the bounce buffer (see BatchReader).
constexpr std::uint64_t kDirectMinBytes = 1024;

// Weight of a row beyond its bytes when splitting work across threads: its
// hash call and bookkeeping. Keeps plans of many tiny or empty rows balanced.
constexpr std::uint64_t kRowCost = 64;

std::size_t iov_limit() {
    static const std::size_t limit = [] {
        const long value = sysconf(_SC_IOV_MAX);
        return static_cast<std::size_t>(std::clamp<long>(value > 0 ? value : 16, 1, 1024));
    }();
    return limit;
}

// Rows whose bytes are all in memory once the current batch is read.
struct Completed {
    const std::byte* first;
    std::uint64_t row_bytes;
    std::uint64_t count;
    std::uint64_t hash_index;
};

// A piece read into the bounce buffer, to be copied (or XORed) to `dst`.
struct Bounced {
    std::byte* dst;
    std::uint64_t at;
    std::uint64_t size;
};

// One thread's reads: pieces of file bytes gathered into batches, each batch
// one preadv of consecutive file bytes, then the copies out of the bounce
// buffer and the hashes of the rows the batch completed.
//
// Large pieces are read straight into their destination, one iovec each.
// Small ones go through a bounce buffer of one batch: the kernel charges
// about 0.2-0.4 us per iovec (100 MB in 192-byte iovecs took 144 ms, in one
// 20 ms), far more than copying a row out of L2, and the gaps between
// nearby pieces land there too instead of costing a system call each.
class BatchReader {
public:
    BatchReader(const FileRun* runs, std::uint64_t* hashes, SegmentOp op, const std::atomic<bool>& stop)
        : runs_(runs), hashes_(hashes), op_(op), stop_(stop) {}

    // Whether bytes at `position` of `fd` can join the batch, the bytes between taken in.
    bool joins(int fd, std::uint64_t position, std::uint64_t size) const {
        if (iov_.empty() || fd != fd_ || position < end_ || iov_.size() + 2 > iov_limit()) return false;
        const std::uint64_t gap = position - end_;
        return gap <= kMaxGapBytes && batch_bytes_ + gap + size <= kBatchBytes;
    }

    // Adds bytes [position, position + size) of run `run`'s file, bound for `dst`.
    bool add(std::size_t run, std::uint64_t position, std::byte* dst, std::uint64_t size) {
        const int fd = runs_[run].fd;
        if (!iov_.empty() && !joins(fd, position, size) && !flush()) return false;
        if (iov_.empty()) {
            fd_ = fd;
            start_ = end_ = position;
            first_run_ = run;
        }
        if (position > end_) bounce(position - end_);  // a gap: read, never used
        if (op_ == SegmentOp::xor_into || size < kDirectMinBytes) {
            bounced_.push_back({dst, bounce_used_, size});
            bounce(size);
        } else {
            iov_.push_back(iovec{dst, static_cast<std::size_t>(size)});
            end_ += size;
            batch_bytes_ += size;
        }
        return true;
    }

    // Rows to hash once the bytes added so far have arrived.
    void complete(const std::byte* first, std::uint64_t row_bytes, std::uint64_t count, std::uint64_t hash_index) {
        if (hashes_ != nullptr) completed_.push_back({first, row_bytes, count, hash_index});
    }

    // Empty rows: nothing to wait for.
    void complete_empty(std::uint64_t count, std::uint64_t hash_index) {
        if (hashes_ == nullptr) return;
        const std::uint64_t empty = xxh3_64(nullptr, 0);
        std::fill(hashes_ + hash_index, hashes_ + hash_index + count, empty);
    }

    bool flush() {
        if (!iov_.empty() && !read_batch()) return false;
        for (const Bounced& b : bounced_) {
            if (op_ == SegmentOp::xor_into) {
                xor_bytes(b.dst, bounce_buffer_.get() + b.at, b.size);
            } else {
                std::memcpy(b.dst, bounce_buffer_.get() + b.at, b.size);
            }
        }
        for (const Completed& c : completed_) {
            for (std::uint64_t r = 0; r < c.count; ++r) {
                hashes_[c.hash_index + r] = xxh3_64(c.first + r * c.row_bytes, c.row_bytes);
            }
        }
        iov_.clear();
        bounced_.clear();
        completed_.clear();
        batch_bytes_ = 0;
        bounce_used_ = 0;
        return true;
    }

    const ReadOutcome& outcome() const { return outcome_; }

private:
    // The next `size` file bytes go to the bounce buffer (extending the last iovec if it ends there).
    void bounce(std::uint64_t size) {
        if (!bounce_buffer_) bounce_buffer_.reset(new std::byte[kBatchBytes]);  // uninitialised: always written first
        std::byte* at = bounce_buffer_.get() + bounce_used_;
        if (!iov_.empty() && static_cast<std::byte*>(iov_.back().iov_base) + iov_.back().iov_len == at) {
            iov_.back().iov_len += size;
        } else {
            iov_.push_back(iovec{at, static_cast<std::size_t>(size)});
        }
        bounce_used_ += size;
        end_ += size;
        batch_bytes_ += size;
    }

    bool read_batch() {
        if (stop_.load(std::memory_order_relaxed)) return false;  // another thread failed: its outcome counts
        std::size_t next = 0;
        std::uint64_t position = start_;
        while (next < iov_.size()) {
            const int n = static_cast<int>(std::min(iov_.size() - next, iov_limit()));
            const ssize_t got = preadv(fd_, iov_.data() + next, n, static_cast<off_t>(position));
            if (got < 0) {
                if (errno == EINTR) continue;
                return fail(ReadOutcome::Status::os_error, position, errno);
            }
            if (got == 0) return fail(ReadOutcome::Status::end_of_file, position, 0);
            position += static_cast<std::uint64_t>(got);
            // Resume after a partial read: drop the iovecs it filled, trim the one it entered.
            auto left = static_cast<std::size_t>(got);
            while (next < iov_.size() && left >= iov_[next].iov_len) {
                left -= iov_[next].iov_len;
                ++next;
            }
            if (left != 0) {
                iov_[next].iov_base = static_cast<std::byte*>(iov_[next].iov_base) + left;
                iov_[next].iov_len -= left;
            }
        }
        return true;
    }

    bool fail(ReadOutcome::Status status, std::uint64_t position, int error) {
        outcome_ = ReadOutcome{status, first_run_, position, end_, error};
        return false;
    }

    const FileRun* runs_;
    std::uint64_t* hashes_;
    SegmentOp op_;
    const std::atomic<bool>& stop_;
    std::unique_ptr<std::byte[]> bounce_buffer_;
    std::uint64_t bounce_used_ = 0;
    std::vector<iovec> iov_;
    std::vector<Bounced> bounced_;
    std::vector<Completed> completed_;
    int fd_ = -1;
    std::size_t first_run_ = 0;
    std::uint64_t start_ = 0;
    std::uint64_t end_ = 0;
    std::uint64_t batch_bytes_ = 0;
    ReadOutcome outcome_;
};

// Rows [first, last) of run `run`, numbered within the run.
struct Piece {
    std::size_t run;
    std::uint64_t first;
    std::uint64_t last;
};

// Reads rows [local, last) of run `r` (numbered within the run); `hash_base`
// is the hash index of the run's row 0.
bool read_rows_of_run(BatchReader& reader, const FileRun* runs, std::size_t r, std::uint64_t local, std::uint64_t last,
                      std::uint64_t hash_base) {
    const FileRun& run = runs[r];
    const std::uint64_t size = run.row_bytes;
    if (size == 0) {
        reader.complete_empty(last - local, hash_base + local);
        return true;
    }
    if (size <= kBatchBytes) {
        const std::uint64_t per_read = kBatchBytes / size;
        while (local < last) {
            const std::uint64_t n = std::min(per_read, last - local);
            std::byte* dst = run.dst + local * size;
            if (!reader.add(r, run.offset + local * size, dst, n * size)) return false;
            reader.complete(dst, size, n, hash_base + local);
            local += n;
        }
        return true;
    }
    for (; local < last; ++local) {  // rows above the batch size arrive in pieces, then hash whole
        std::byte* dst = run.dst + local * size;
        for (std::uint64_t done = 0; done < size; done += kBatchBytes) {
            if (!reader.add(r, run.offset + local * size + done, dst + done, std::min(kBatchBytes, size - done))) {
                return false;
            }
        }
        reader.complete(dst, size, 1, hash_base + local);
    }
    return true;
}

}  // namespace

ReadOutcome read_runs(const FileRun* runs, std::size_t n_runs, std::uint64_t* hashes, SegmentOp op) {
    // Work is numbered by row, across runs: row_prefix[r] is the first row of run r.
    std::vector<std::uint64_t> row_prefix(n_runs + 1, 0);
    std::vector<std::uint64_t> weight_prefix(n_runs + 1, 0);
    for (std::size_t r = 0; r < n_runs; ++r) {
        // Rows need not be visited one by one when nothing is hashed and they hold no bytes.
        const bool idle = runs[r].row_bytes == 0 && hashes == nullptr;
        const std::uint64_t count = idle ? 0 : runs[r].count;
        row_prefix[r + 1] = row_prefix[r] + count;
        weight_prefix[r + 1] = weight_prefix[r] + count * (runs[r].row_bytes + kRowCost);
    }
    const std::uint64_t total_rows = row_prefix[n_runs];
    auto run_of_row = [&](std::uint64_t row) {
        return static_cast<std::size_t>(std::upper_bound(row_prefix.begin(), row_prefix.end(), row) -
                                        row_prefix.begin()) - 1;
    };
    std::atomic<bool> stop{false};
    std::mutex failure_lock;
    ReadOutcome failure;
    std::vector<std::uint64_t> hash_start(n_runs);  // hash index of each run's row 0 (the full counts)
    std::uint64_t next_hash = 0;
    for (std::size_t r = 0; r < n_runs; ++r) {
        hash_start[r] = next_hash;
        next_hash += runs[r].count;
    }
    parallel_by_weight(
        static_cast<std::size_t>(total_rows),
        [&](std::size_t row) {
            if (row >= total_rows) return weight_prefix[n_runs];
            const std::size_t r = run_of_row(row);
            return weight_prefix[r] + (row - row_prefix[r]) * (runs[r].row_bytes + kRowCost);
        },
        [&](std::size_t begin, std::size_t end) {
            // This thread's share of every run, read in file order: a plan in destination
            // order (rows gathered from many objects) would otherwise pay a read per row.
            std::vector<Piece> pieces;
            for (std::uint64_t row = begin; row < end;) {
                const std::size_t r = run_of_row(row);
                const std::uint64_t last = std::min<std::uint64_t>(end, row_prefix[r + 1]);
                pieces.push_back(Piece{r, row - row_prefix[r], last - row_prefix[r]});
                row = last;
            }
            auto file_order = [&](const Piece& a, const Piece& b) {
                const FileRun& x = runs[a.run];
                const FileRun& y = runs[b.run];
                if (x.fd != y.fd) return x.fd < y.fd;
                return x.offset + a.first * x.row_bytes < y.offset + b.first * y.row_bytes;
            };
            if (!std::is_sorted(pieces.begin(), pieces.end(), file_order)) {
                std::sort(pieces.begin(), pieces.end(), file_order);
            }
            BatchReader reader(runs, hashes, op, stop);
            bool ok = true;
            for (std::size_t k = 0; ok && k < pieces.size(); ++k) {
                const Piece& p = pieces[k];
                ok = read_rows_of_run(reader, runs, p.run, p.first, p.last, hash_start[p.run]);
            }
            ok = ok && reader.flush();
            if (!ok && reader.outcome().status != ReadOutcome::Status::ok) {
                std::lock_guard<std::mutex> guard(failure_lock);
                if (failure.status == ReadOutcome::Status::ok) failure = reader.outcome();
                stop.store(true, std::memory_order_relaxed);
            }
        });
    return failure;
}

ReadOutcome read_exact(int fd, std::uint64_t position, std::byte* dst, std::uint64_t size) noexcept {
    const std::uint64_t end = position + size;
    while (position < end) {
        const std::uint64_t want = std::min<std::uint64_t>(end - position, std::uint64_t{1} << 30);
        const ssize_t got = pread(fd, dst, static_cast<std::size_t>(want), static_cast<off_t>(position));
        if (got < 0) {
            if (errno == EINTR) continue;
            return ReadOutcome{ReadOutcome::Status::os_error, 0, position, end, errno};
        }
        if (got == 0) return ReadOutcome{ReadOutcome::Status::end_of_file, 0, position, end, 0};
        position += static_cast<std::uint64_t>(got);
        dst += got;
    }
    return ReadOutcome{};
}

}  // namespace mmpack
