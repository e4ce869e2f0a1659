// The only file that sees Python: turns buffers into spans, checks every
// size and offset of a plan before any byte moves, then runs the kernels with
// the GIL released.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "mmpack/copy.hpp"
#include "mmpack/fields.hpp"
#include "mmpack/parallel.hpp"
#include "mmpack/rans.hpp"
#include "mmpack/read.hpp"
#include "mmpack/transform.hpp"
#include "mmpack/xxh3.hpp"

namespace py = pybind11;

namespace {

using mmpack::Segment;

// A held buffer export (PEP 3118). Holding it keeps the exporter's memory
// alive and unresizable while the GIL is released.
class Buffer {
public:
    Buffer(py::handle obj, bool writable, const std::string& what) {
        const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
            PyErr_Clear();
            throw py::type_error(what + " must be a C-contiguous" + (writable ? " writable" : "") +
                                 " buffer (bytes, bytearray, memoryview or numpy array), got " +
                                 std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
        }
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    Buffer(Buffer&& other) noexcept : view_(other.view_) { other.view_.obj = nullptr; }
    ~Buffer() {
        if (view_.obj != nullptr) PyBuffer_Release(&view_);
    }

    std::byte* data() const { return static_cast<std::byte*>(view_.buf); }
    std::size_t size() const { return static_cast<std::size_t>(view_.len); }
    std::size_t itemsize() const { return static_cast<std::size_t>(view_.itemsize); }
    const char* format() const { return view_.format != nullptr ? view_.format : "B"; }

private:
    Py_buffer view_{};
};

// A held uint64 array (numpy.uint64 or array('Q')): the tables of a plan.
class U64Array {
public:
    U64Array(py::handle obj, bool writable, const std::string& what) : buf_(obj, writable, what) {
        std::string fmt = buf_.format();
        if (!fmt.empty() && (fmt[0] == '<' || fmt[0] == '=' || fmt[0] == '@')) fmt.erase(0, 1);
        if (buf_.itemsize() != 8 || (fmt != "Q" && fmt != "L")) {
            throw py::type_error(what + " must be an array of uint64 (numpy.uint64), got format '" +
                                 std::string(buf_.format()) + "' with itemsize " + std::to_string(buf_.itemsize()));
        }
    }

    std::uint64_t* data() const { return reinterpret_cast<std::uint64_t*>(buf_.data()); }
    std::size_t size() const { return buf_.size() / 8; }
    std::uint64_t operator[](std::size_t i) const { return data()[i]; }

private:
    Buffer buf_;
};

std::vector<Buffer> hold_buffers(const py::sequence& objs, bool writable, const char* what) {
    std::vector<Buffer> held;
    held.reserve(py::len(objs));
    for (std::size_t i = 0; i < py::len(objs); ++i) {
        held.emplace_back(objs[i], writable, std::string(what) + "[" + std::to_string(i) + "]");
    }
    return held;
}

void require_same_length(std::size_t expected, const U64Array& table, const char* name) {
    if (table.size() != expected) {
        throw py::value_error(std::string(name) + " has " + std::to_string(table.size()) +
                              " entries; the plan has " + std::to_string(expected) + " segments");
    }
}

// Resolves (buffer index, offset, length) to a pointer, or explains why the
// range lies outside the buffer.
std::byte* locate(const std::vector<Buffer>& buffers, std::uint64_t index, std::uint64_t offset,
                  std::uint64_t length, std::size_t segment, const char* side) {
    if (index >= buffers.size()) {
        throw py::value_error("segment " + std::to_string(segment) + ": " + side + " buffer index " +
                              std::to_string(index) + " out of range (" + std::to_string(buffers.size()) +
                              " buffers)");
    }
    const std::size_t size = buffers[index].size();
    if (length > size || offset > size - length) {
        throw py::value_error("segment " + std::to_string(segment) + ": " + side + " range [" +
                              std::to_string(offset) + ", " + std::to_string(offset) + " + " +
                              std::to_string(length) + ") exceeds " + side + " buffer " + std::to_string(index) +
                              " of " + std::to_string(size) + " bytes");
    }
    return buffers[index].data() + offset;
}

std::byte* from_address(std::uint64_t address, std::uint64_t length, std::size_t segment, const char* side) {
    if (address == 0 && length != 0) {
        throw py::value_error("segment " + std::to_string(segment) + ": null " + side + " address");
    }
    return reinterpret_cast<std::byte*>(static_cast<std::uintptr_t>(address));
}

std::uint64_t* optional_hashes(const py::object& hashes, std::size_t n_segments, std::vector<U64Array>& holder) {
    if (hashes.is_none()) return nullptr;
    holder.emplace_back(hashes, true, "hashes");
    require_same_length(n_segments, holder.back(), "hashes");
    return holder.back().data();
}

void run_segments(const std::vector<Segment>& segments, std::uint64_t* hashes,
                  mmpack::SegmentOp op = mmpack::SegmentOp::copy) {
    py::gil_scoped_release release;
    mmpack::copy_segments(segments.data(), segments.size(), hashes, op);
}

std::uint64_t py_xxh3_64(const py::handle& data, std::uint64_t seed) {
    Buffer buf(data, false, "data");
    if (buf.size() < (std::size_t{1} << 16)) return mmpack::xxh3_64(buf.data(), buf.size(), seed);
    py::gil_scoped_release release;
    return mmpack::xxh3_64(buf.data(), buf.size(), seed);
}

void py_hash_rows(const py::handle& data, std::uint64_t row_bytes, const py::handle& out) {
    Buffer buf(data, false, "data");
    U64Array hashes(out, true, "out");
    const std::size_t n_rows = hashes.size();
    if (row_bytes != 0 && n_rows > buf.size() / row_bytes) {
        throw py::value_error("data holds " + std::to_string(buf.size()) + " bytes, fewer than " +
                              std::to_string(n_rows) + " rows of " + std::to_string(row_bytes) + " bytes");
    }
    if (n_rows * row_bytes != buf.size()) {
        throw py::value_error("data holds " + std::to_string(buf.size()) + " bytes, not " + std::to_string(n_rows) +
                              " rows of " + std::to_string(row_bytes) + " bytes");
    }
    py::gil_scoped_release release;
    mmpack::hash_rows(mmpack::ConstBytes{buf.data(), buf.size()}, row_bytes, n_rows, hashes.data());
}

void py_gather(const py::handle& src_addresses, const py::handle& lengths, const py::sequence& dst,
               const py::handle& dst_index, const py::handle& dst_offsets, const py::object& hashes) {
    const U64Array addr(src_addresses, false, "src_addresses");
    const U64Array len(lengths, false, "lengths");
    const U64Array d_index(dst_index, false, "dst_index");
    const U64Array d_offset(dst_offsets, false, "dst_offsets");
    const std::size_t n = len.size();
    require_same_length(n, addr, "src_addresses");
    require_same_length(n, d_index, "dst_index");
    require_same_length(n, d_offset, "dst_offsets");
    const std::vector<Buffer> dsts = hold_buffers(dst, true, "dst");
    std::vector<U64Array> hash_holder;
    std::uint64_t* out = optional_hashes(hashes, n, hash_holder);
    std::vector<Segment> segments(n);
    for (std::size_t k = 0; k < n; ++k) {
        segments[k] = Segment{from_address(addr[k], len[k], k, "source"),
                              locate(dsts, d_index[k], d_offset[k], len[k], k, "destination"), len[k]};
    }
    run_segments(segments, out);
}

void py_scatter(const py::sequence& src, const py::handle& src_index, const py::handle& src_offsets,
                const py::handle& lengths, const py::handle& dst_addresses) {
    const U64Array s_index(src_index, false, "src_index");
    const U64Array s_offset(src_offsets, false, "src_offsets");
    const U64Array len(lengths, false, "lengths");
    const U64Array addr(dst_addresses, false, "dst_addresses");
    const std::size_t n = len.size();
    require_same_length(n, s_index, "src_index");
    require_same_length(n, s_offset, "src_offsets");
    require_same_length(n, addr, "dst_addresses");
    const std::vector<Buffer> srcs = hold_buffers(src, false, "src");
    std::vector<Segment> segments(n);
    for (std::size_t k = 0; k < n; ++k) {
        segments[k] = Segment{locate(srcs, s_index[k], s_offset[k], len[k], k, "source"),
                              from_address(addr[k], len[k], k, "destination"), len[k]};
    }
    run_segments(segments, nullptr);
}

void py_copy_segments(const py::sequence& src, const py::handle& src_index, const py::handle& src_offsets,
                      const py::sequence& dst, const py::handle& dst_index, const py::handle& dst_offsets,
                      const py::handle& lengths, const py::object& hashes, bool xor_into) {
    const U64Array s_index(src_index, false, "src_index");
    const U64Array s_offset(src_offsets, false, "src_offsets");
    const U64Array d_index(dst_index, false, "dst_index");
    const U64Array d_offset(dst_offsets, false, "dst_offsets");
    const U64Array len(lengths, false, "lengths");
    const std::size_t n = len.size();
    require_same_length(n, s_index, "src_index");
    require_same_length(n, s_offset, "src_offsets");
    require_same_length(n, d_index, "dst_index");
    require_same_length(n, d_offset, "dst_offsets");
    const std::vector<Buffer> srcs = hold_buffers(src, false, "src");
    const std::vector<Buffer> dsts = hold_buffers(dst, true, "dst");
    std::vector<U64Array> hash_holder;
    std::uint64_t* out = optional_hashes(hashes, n, hash_holder);
    std::vector<Segment> segments(n);
    for (std::size_t k = 0; k < n; ++k) {
        segments[k] = Segment{locate(srcs, s_index[k], s_offset[k], len[k], k, "source"),
                              locate(dsts, d_index[k], d_offset[k], len[k], k, "destination"), len[k]};
    }
    run_segments(segments, out, xor_into ? mmpack::SegmentOp::xor_into : mmpack::SegmentOp::copy);
}

// _native.ShortReadError (an EOFError): a file ended before a read did. Its
// args are (message, file index, position where the file ended, wanted end).
PyObject* g_short_read_error = nullptr;

std::vector<int> descriptors(const py::sequence& fds) {
    std::vector<int> result;
    for (std::size_t i = 0; i < py::len(fds); ++i) {
        const long long fd = py::cast<long long>(fds[i]);
        if (fd < 0 || fd > INT_MAX) throw py::value_error("fds[" + std::to_string(i) + "] is not a file descriptor");
        result.push_back(static_cast<int>(fd));
    }
    return result;
}

std::uint64_t checked_product(std::uint64_t a, std::uint64_t b, std::size_t run, const char* what) {
    if (a != 0 && b > UINT64_MAX / a) {
        throw py::value_error("run " + std::to_string(run) + ": " + what + " overflows 64 bits");
    }
    return a * b;
}

// ShortReadError (the file ended early) or OSError (with the file's index as its file_index)
// for a failed read of file #file; `what` names the run or job that was reading.
[[noreturn]] void raise_read_failure(const mmpack::ReadOutcome& outcome, std::uint64_t file, const std::string& what) {
    if (outcome.status == mmpack::ReadOutcome::Status::end_of_file) {
        const std::string message = "file #" + std::to_string(file) + " ends at byte " +
                                    std::to_string(outcome.position) + "; a read of " + what +
                                    " wanted bytes up to " + std::to_string(outcome.wanted_end);
        PyErr_SetObject(g_short_read_error, py::make_tuple(message, file, outcome.position, outcome.wanted_end).ptr());
        throw py::error_already_set();
    }
    const std::string message = std::string(std::strerror(outcome.error)) + " (reading file #" + std::to_string(file) +
                                " at byte " + std::to_string(outcome.position) + ")";
    // The file's index rides along, so that callers reading many objects can say whose read failed.
    py::object error = py::reinterpret_steal<py::object>(
        PyObject_CallObject(PyExc_OSError, py::make_tuple(outcome.error, message).ptr()));
    if (!error) throw py::error_already_set();
    error.attr("file_index") = file;
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
    throw py::error_already_set();
}

void py_read_rows(const py::sequence& fds, const py::handle& fd_index, const py::handle& offsets,
                  const py::handle& row_bytes, const py::handle& counts, const py::sequence& dst,
                  const py::handle& dst_index, const py::handle& dst_offsets, const py::object& hashes,
                  bool xor_into) {
    const U64Array f_index(fd_index, false, "fd_index");
    const U64Array offset(offsets, false, "offsets");
    const U64Array size(row_bytes, false, "row_bytes");
    const U64Array count(counts, false, "counts");
    const U64Array d_index(dst_index, false, "dst_index");
    const U64Array d_offset(dst_offsets, false, "dst_offsets");
    const std::size_t n = count.size();
    require_same_length(n, f_index, "fd_index");
    require_same_length(n, offset, "offsets");
    require_same_length(n, size, "row_bytes");
    require_same_length(n, d_index, "dst_index");
    require_same_length(n, d_offset, "dst_offsets");
    const std::vector<int> files = descriptors(fds);
    const std::vector<Buffer> dsts = hold_buffers(dst, true, "dst");
    std::vector<mmpack::FileRun> runs(n);
    std::uint64_t total_rows = 0;
    constexpr std::uint64_t kMaxPosition = static_cast<std::uint64_t>(INT64_MAX);  // off_t
    for (std::size_t k = 0; k < n; ++k) {
        if (f_index[k] >= files.size()) {
            throw py::value_error("run " + std::to_string(k) + ": file index " + std::to_string(f_index[k]) +
                                  " out of range (" + std::to_string(files.size()) + " files)");
        }
        const std::uint64_t bytes = checked_product(size[k], count[k], k, "row_bytes * counts");
        if (offset[k] > kMaxPosition || bytes > kMaxPosition - offset[k]) {
            throw py::value_error("run " + std::to_string(k) + ": file range [" + std::to_string(offset[k]) + ", +" +
                                  std::to_string(bytes) + ") lies beyond any file position");
        }
        if (count[k] > UINT64_MAX - total_rows) throw py::value_error("the counts sum above 64 bits");
        total_rows += count[k];
        runs[k] = mmpack::FileRun{files[f_index[k]], offset[k],
                                  locate(dsts, d_index[k], d_offset[k], bytes, k, "destination"), size[k], count[k]};
    }
    std::vector<U64Array> hash_holder;
    std::uint64_t* out = nullptr;
    if (!hashes.is_none()) {
        hash_holder.emplace_back(hashes, true, "hashes");
        if (hash_holder.back().size() != total_rows) {
            throw py::value_error("hashes has " + std::to_string(hash_holder.back().size()) +
                                  " entries; the runs hold " + std::to_string(total_rows) + " rows");
        }
        out = hash_holder.back().data();
    }
    mmpack::ReadOutcome outcome;
    {
        py::gil_scoped_release release;
        outcome = mmpack::read_runs(runs.data(), runs.size(), out,
                                    xor_into ? mmpack::SegmentOp::xor_into : mmpack::SegmentOp::copy);
    }
    if (outcome.status != mmpack::ReadOutcome::Status::ok) {
        raise_read_failure(outcome, f_index[outcome.run], "run " + std::to_string(outcome.run));
    }
}

// Checks shared by both directions of the byte-plane transform.
void py_byte_planes(const py::handle& src, const py::handle& dst, std::size_t width, bool split) {
    if (width < 1 || width > mmpack::kMaxPlaneWidth) {
        throw py::value_error("width must be an element size between 1 and " +
                              std::to_string(mmpack::kMaxPlaneWidth) + " bytes, got " + std::to_string(width));
    }
    const Buffer in(src, false, "src");
    const Buffer out(dst, true, "dst");
    if (in.size() != out.size()) {
        throw py::value_error("dst holds " + std::to_string(out.size()) + " bytes; it must hold exactly the " +
                              std::to_string(in.size()) + " bytes of src");
    }
    const std::byte* in_end = in.data() + in.size();
    const std::byte* out_end = out.data() + out.size();
    if (in.size() != 0 && in.data() < out_end && out.data() < in_end) {
        throw py::value_error("src and dst overlap; the transform needs a separate destination buffer");
    }
    py::gil_scoped_release release;
    if (split) {
        mmpack::split_byte_planes(mmpack::ConstBytes{in.data(), in.size()}, mmpack::MutableBytes{out.data(), out.size()},
                                  width);
    } else {
        mmpack::merge_byte_planes(mmpack::ConstBytes{in.data(), in.size()}, mmpack::MutableBytes{out.data(), out.size()},
                                  width);
    }
}

void py_merge_byte_planes_from(const py::sequence& planes, const py::handle& dst, std::size_t width) {
    if (width < 1 || width > mmpack::kMaxPlaneWidth) {
        throw py::value_error("width must be an element size between 1 and " +
                              std::to_string(mmpack::kMaxPlaneWidth) + " bytes, got " + std::to_string(width));
    }
    if (py::len(planes) != width) {
        throw py::value_error("expected " + std::to_string(width) + " planes, got " + std::to_string(py::len(planes)));
    }
    const Buffer out(dst, true, "dst");
    if (out.size() % width != 0) {
        throw py::value_error("dst holds " + std::to_string(out.size()) + " bytes, not whole elements of " +
                              std::to_string(width) + " bytes");
    }
    const std::vector<Buffer> held = hold_buffers(planes, false, "planes");
    std::vector<const std::byte*> pointers;
    const std::size_t n = out.size() / width;
    for (std::size_t p = 0; p < width; ++p) {
        if (held[p].size() != n) {
            throw py::value_error("planes[" + std::to_string(p) + "] holds " + std::to_string(held[p].size()) +
                                  " bytes; each plane must hold " + std::to_string(n));
        }
        const std::byte* end = held[p].data() + n;
        if (n != 0 && held[p].data() < out.data() + out.size() && out.data() < end) {
            throw py::value_error("planes[" + std::to_string(p) + "] overlaps dst");
        }
        pointers.push_back(held[p].data());
    }
    py::gil_scoped_release release;
    mmpack::merge_byte_planes_from(pointers.data(), mmpack::MutableBytes{out.data(), out.size()}, width);
}

// -- the rANS field codec (format version 3) -------------------------------------

// _native.DecodeError (a ValueError): a compressed stream or table is corrupt.
// args: (message, job index).
PyObject* g_decode_error = nullptr;

mmpack::fields::Layout layout_from_code(std::uint64_t code, const std::string& what) {
    const auto width = static_cast<unsigned>(code & 0xFF);
    const auto family = static_cast<unsigned>(code >> 8);
    if (family > 2 || !mmpack::fields::valid_layout(width, static_cast<mmpack::fields::Family>(family))) {
        throw py::value_error(what + ": unknown element layout " + std::to_string(code));
    }
    return mmpack::fields::Layout{width, static_cast<mmpack::fields::Family>(family)};
}

// Asks for transparent huge pages over a buffer's capacity (advisory; a no-op where the kernel
// has them off, or off Linux). The encoder writes each section into fresh memory once, and on
// these VMs the first touch of a 4 KiB page costs about a microsecond: a fifth of a float32
// encode. (numpy asks the same for its large arrays.)
void prefer_huge_pages(std::vector<std::uint8_t>& buffer) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
    const auto start = reinterpret_cast<std::uintptr_t>(buffer.data());
    const std::uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
    const std::uintptr_t end = (start + buffer.capacity()) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)buffer;
#endif
}

// The encoded section of one tensor: its table block, then its chunks, back to back.
class EncodedSection {
public:
    std::vector<std::uint8_t> bytes;
    std::size_t table_length = 0;
    std::vector<std::uint64_t> chunk_lengths;
};

std::unique_ptr<EncodedSection> py_rans_encode(const py::handle& data, std::uint64_t rows, std::uint64_t row_bytes,
                                               std::uint64_t chunk_rows, std::uint64_t layout_code) {
    const Buffer buf(data, false, "data");
    const mmpack::fields::Layout layout = layout_from_code(layout_code, "layout");
    if (chunk_rows == 0) throw py::value_error("chunk_rows must be at least 1");
    if (row_bytes % layout.width != 0) {
        throw py::value_error("row_bytes " + std::to_string(row_bytes) + " is not whole elements of " +
                              std::to_string(layout.width) + " bytes");
    }
    if ((row_bytes != 0 && rows > buf.size() / row_bytes) || rows * row_bytes != buf.size()) {
        throw py::value_error("data holds " + std::to_string(buf.size()) + " bytes, not " + std::to_string(rows) +
                              " rows of " + std::to_string(row_bytes) + " bytes");
    }
    auto section = std::make_unique<EncodedSection>();
    const std::size_t n_chunks = rows == 0 ? 0 : static_cast<std::size_t>((rows - 1) / chunk_rows + 1);
    section->chunk_lengths.assign(n_chunks, 0);
    if (buf.size() == 0) return section;  // no elements: no table, empty chunks
    const char* failure = nullptr;
    {
        py::gil_scoped_release release;
        const std::size_t chunk_bytes = static_cast<std::size_t>(std::min<std::uint64_t>(chunk_rows, rows) * row_bytes);
        const mmpack::fields::Model model = mmpack::fields::choose_model(
            mmpack::ConstBytes{buf.data(), buf.size()}, layout, chunk_bytes / layout.width);
        // The first range of chunks (the calling thread's) is encoded straight into the section
        // and every other range into one buffer of its own, appended after the join: each byte
        // is written to fresh memory once, not into a chunk's buffer and then again into the
        // section (faulting fresh pages in twice was a quarter of the encoding time). Capacity
        // is reserved generously: pages never written are never touched.
        const auto room = [&](std::size_t bytes) { return bytes + bytes / 2 + 4096 * (bytes / chunk_bytes + 1); };
        section->bytes.reserve(room(buf.size()) + 65536);
        prefer_huge_pages(section->bytes);
        mmpack::fields::write_model(model, section->bytes);
        section->table_length = section->bytes.size();
        const mmpack::fields::Encoder encoder(model);
        std::vector<std::vector<std::uint8_t>> ranges(n_chunks);  // a range's buffer, at its first chunk
        std::vector<const char*> errors(n_chunks, nullptr);
        std::atomic<bool> out_of_memory{false};
        mmpack::parallel_by_weight(
            n_chunks, [&](std::size_t c) { return static_cast<std::uint64_t>(std::min(c * chunk_bytes, buf.size())); },
            [&](std::size_t first, std::size_t last) {
                try {  // nothing may escape a worker thread
                    std::vector<std::uint8_t>& out = first == 0 ? section->bytes : ranges[first];
                    if (first != 0) {
                        out.reserve(room(std::min(last * chunk_bytes, buf.size()) - first * chunk_bytes));
                        prefer_huge_pages(out);
                    }
                    const auto chunk = [&](std::size_t c) {
                        const std::size_t begin = c * chunk_bytes;
                        return mmpack::ConstBytes{buf.data() + begin, std::min(chunk_bytes, buf.size() - begin)};
                    };
                    // Two chunks at a time: their rANS chains overlap (encode_two).
                    for (std::size_t c = first; c < last && errors[c] == nullptr; c += 2) {
                        if (c + 1 < last) {
                            const mmpack::ConstBytes two[2] = {chunk(c), chunk(c + 1)};
                            std::size_t lengths[2] = {0, 0};
                            errors[c] = encoder.encode_two(two, out, lengths);
                            section->chunk_lengths[c] = lengths[0];
                            section->chunk_lengths[c + 1] = lengths[1];
                            if (errors[c] != nullptr) break;
                        } else {
                            const std::size_t before = out.size();
                            errors[c] = encoder.encode(chunk(c), out);
                            section->chunk_lengths[c] = out.size() - before;
                        }
                    }
                } catch (const std::bad_alloc&) {
                    out_of_memory = true;
                }
            });
        if (out_of_memory) throw std::bad_alloc();
        for (std::size_t c = 0; c < n_chunks && failure == nullptr; ++c) failure = errors[c];
        if (failure == nullptr) {
            for (auto& range : ranges) {
                if (range.empty()) continue;
                section->bytes.insert(section->bytes.end(), range.begin(), range.end());
                std::vector<std::uint8_t>().swap(range);
            }
        }
    }
    if (failure != nullptr) throw std::logic_error(std::string("encoder invariant broken: ") + failure);
    return section;
}

void py_rans_encoder_quotients(const py::handle& states, const py::handle& freqs, const py::handle& out) {
    const Buffer x(states, false, "states"), f(freqs, false, "freqs"), q(out, true, "out");
    for (const Buffer* b : {&x, &f, &q}) {
        if (b->itemsize() != 4) throw py::type_error("states, freqs and out must hold uint32 values");
    }
    if (f.size() != x.size() || q.size() != x.size()) throw py::value_error("states, freqs and out differ in length");
    const std::size_t n = x.size() / 4;
    const auto* xs = reinterpret_cast<const std::uint32_t*>(x.data());
    const auto* fs = reinterpret_cast<const std::uint32_t*>(f.data());
    for (std::size_t i = 0; i < n; ++i) {
        if (fs[i] == 0 || fs[i] >= mmpack::rans::kScale || xs[i] >= std::uint64_t{fs[i]} << 20) {
            throw py::value_error("pair " + std::to_string(i) + " is not one the encoder divides (state " +
                                  std::to_string(xs[i]) + ", freq " + std::to_string(fs[i]) + ")");
        }
    }
    mmpack::rans::encoder_quotients(xs, fs, n, reinterpret_cast<std::uint32_t*>(q.data()));
}

std::vector<std::string> py_rans_simd_paths() {
    using mmpack::rans::Simd;
    std::vector<std::string> paths;
    for (int level = 0; level <= static_cast<int>(mmpack::rans::best_simd()); ++level) {
        paths.emplace_back(mmpack::rans::simd_name(static_cast<Simd>(level)));
    }
    return paths;
}

void py_rans_set_simd(const std::string& path) {
    using mmpack::rans::Simd;
    for (const Simd level : {Simd::scalar, Simd::avx2, Simd::avx512}) {
        if (path != mmpack::rans::simd_name(level)) continue;
        if (level > mmpack::rans::best_simd()) {
            throw py::value_error("this CPU cannot run the " + path + " rANS loops (it runs up to " +
                                  mmpack::rans::simd_name(mmpack::rans::best_simd()) + ")");
        }
        mmpack::rans::limit_simd(level);
        return;
    }
    throw py::value_error("unknown rANS loops " + path + ": expected scalar, avx2 or avx512");
}

constexpr std::size_t kJobColumns = 10;

[[noreturn]] void raise_decode_error(const std::string& message, std::size_t job) {
    PyErr_SetObject(g_decode_error, py::make_tuple(message, job).ptr());
    throw py::error_already_set();
}

// Where decode jobs find their chunks: in buffers already read (a job's payload index and
// offset locate it there), or in open files (the index names a descriptor, the offset is a file
// position), read by the thread that decodes them into a buffer of its own, still in cache when
// it decodes them.
// Bytes of chunks read from files that one thread decodes together at most.
constexpr std::size_t kTogetherBytes = std::size_t{1} << 20;

struct ChunkSource {
    std::vector<Buffer> buffers;
    std::vector<int> fds;
    bool from_files = false;
};

struct DecodeJob {
    std::size_t table;
    const std::byte* payload;  // in a buffer; null when read from a file
    int fd;
    std::uint64_t position;
    std::size_t length;
    std::byte* out;
    std::size_t out_length;
    std::size_t elements;  // in the whole chunk; out_length may hold only a prefix of them
    std::size_t row_bytes;
    std::uint64_t* hashes;
    std::uint64_t file;  // the descriptor's index, for errors
};

// One thread's buffers for chunks read from files: one per chunk decoded together, grown as
// needed and never zeroed (each byte is read before it is decoded). They outlive a call, so that
// reading one model (a chunk per tensor, on the calling thread) does not fault in fresh pages
// every time: buffers of chunks of up to kKeptBytes are kept, larger ones freed after the call.
class ChunkBuffers {
public:
    static constexpr std::size_t kKeptBytes = std::size_t{1} << 20;

    // Null when the memory cannot be had (an exception must not leave a worker thread).
    std::byte* get(unsigned slot, std::size_t size) noexcept {
        if (capacity_[slot] < size) {
            buffers_[slot].reset(new (std::nothrow) std::byte[size]);
            capacity_[slot] = buffers_[slot] ? size : 0;
        }
        return buffers_[slot].get();
    }

    void trim() noexcept {
        for (unsigned slot = 0; slot < mmpack::rans::kMaxTogether; ++slot) {
            if (capacity_[slot] > kKeptBytes) {
                buffers_[slot].reset();
                capacity_[slot] = 0;
            }
        }
    }

private:
    std::unique_ptr<std::byte[]> buffers_[mmpack::rans::kMaxTogether];
    std::size_t capacity_[mmpack::rans::kMaxTogether] = {};
};

// A read that failed (or a chunk buffer that could not be allocated). Other threads stop at their
// next chunk, so which failure is found can vary with timing when several would fail; of those
// found, the lowest job is reported.
struct ReadFailure {
    std::mutex lock;
    std::atomic<bool> failed{false};
    std::size_t job = SIZE_MAX;
    mmpack::ReadOutcome outcome;
    bool out_of_memory = false;

    void record(std::size_t k, const mmpack::ReadOutcome& o) { note(k, o, false); }
    void record_out_of_memory(std::size_t k) { note(k, mmpack::ReadOutcome{}, true); }

private:
    void note(std::size_t k, const mmpack::ReadOutcome& o, bool memory) {
        std::lock_guard<std::mutex> guard(lock);
        if (k < job) {
            job = k;
            outcome = o;
            out_of_memory = memory;
        }
        failed.store(true, std::memory_order_relaxed);
    }
};

void rans_decode_jobs(const py::sequence& tables, const py::handle& layouts, const ChunkSource& source,
                      const py::handle& jobs_array, const py::sequence& dst, const py::object& hashes) {
    const U64Array layout_codes(layouts, false, "layouts");
    const U64Array jobs(jobs_array, false, "jobs");
    if (layout_codes.size() != py::len(tables)) {
        throw py::value_error("layouts has " + std::to_string(layout_codes.size()) + " entries for " +
                              std::to_string(py::len(tables)) + " tables");
    }
    if (jobs.size() % kJobColumns != 0) throw py::value_error("jobs must hold 10 numbers per job");
    const std::size_t n_jobs = jobs.size() / kJobColumns;
    std::vector<mmpack::fields::Layout> table_layouts;
    for (std::size_t t = 0; t < layout_codes.size(); ++t) {
        table_layouts.push_back(layout_from_code(layout_codes[t], "layouts[" + std::to_string(t) + "]"));
    }
    const std::vector<Buffer> table_buffers = hold_buffers(tables, false, "tables");
    const std::vector<Buffer> dsts = hold_buffers(dst, true, "dst");
    std::vector<U64Array> hash_holder;
    std::uint64_t* hash_out = nullptr;
    std::size_t n_hashes = 0;
    if (!hashes.is_none()) {
        hash_holder.emplace_back(hashes, true, "hashes");
        hash_out = hash_holder.back().data();
        n_hashes = hash_holder.back().size();
    }
    constexpr std::uint64_t kMaxPosition = static_cast<std::uint64_t>(INT64_MAX);  // off_t
    std::vector<DecodeJob> work(n_jobs);
    std::vector<char> used(table_buffers.size(), 0);
    for (std::size_t k = 0; k < n_jobs; ++k) {
        const std::uint64_t* j = jobs.data() + k * kJobColumns;
        if (j[0] >= table_buffers.size()) throw py::value_error("job " + std::to_string(k) + ": table index out of range");
        DecodeJob& job = work[k];
        job.table = static_cast<std::size_t>(j[0]);
        used[job.table] = 1;
        job.length = static_cast<std::size_t>(j[3]);
        job.file = j[1];
        if (source.from_files) {
            if (j[1] >= source.fds.size()) {
                throw py::value_error("job " + std::to_string(k) + ": file index " + std::to_string(j[1]) +
                                      " out of range (" + std::to_string(source.fds.size()) + " files)");
            }
            if (j[2] > kMaxPosition || j[3] > kMaxPosition - j[2]) {
                throw py::value_error("job " + std::to_string(k) + ": its chunk lies beyond any file position");
            }
            job.payload = nullptr;
            job.fd = source.fds[j[1]];
            job.position = j[2];
        } else {
            job.payload = locate(source.buffers, j[1], j[2], j[3], k, "payload");
            job.fd = -1;
            job.position = 0;
        }
        job.out = locate(dsts, j[4], j[5], j[6], k, "destination");
        job.out_length = static_cast<std::size_t>(j[6]);
        job.row_bytes = static_cast<std::size_t>(j[7]);
        job.hashes = nullptr;
        const unsigned width = table_layouts[job.table].width;
        if (job.out_length % width != 0 || j[9] % width != 0) {
            throw py::value_error("job " + std::to_string(k) + ": output is not whole elements");
        }
        if (j[6] > j[9]) throw py::value_error("job " + std::to_string(k) + ": output is longer than its chunk");
        job.elements = static_cast<std::size_t>(j[9] / width);
        if (job.row_bytes != 0) {
            if (job.out_length % job.row_bytes != 0) {
                throw py::value_error("job " + std::to_string(k) + ": output is not whole rows");
            }
            const std::uint64_t rows = job.out_length / job.row_bytes;
            if (hash_out == nullptr || j[8] > n_hashes || rows > n_hashes - j[8]) {
                throw py::value_error("job " + std::to_string(k) + ": row hashes fall outside hashes");
            }
            job.hashes = hash_out + j[8];
        }
    }
    // Parse each table the jobs use once; a bad one is corrupt data, reported with a job that needs it.
    std::vector<std::unique_ptr<mmpack::fields::Decoder>> decoders(table_buffers.size());
    for (std::size_t t = 0; t < table_buffers.size(); ++t) {
        if (!used[t]) continue;
        const mmpack::fields::Layout layout = table_layouts[t];
        mmpack::fields::Model model;
        const char* problem = nullptr;
        {
            py::gil_scoped_release release;
            problem = mmpack::fields::read_model(
                mmpack::ConstBytes{table_buffers[t].data(), table_buffers[t].size()}, layout, model);
        }
        if (problem != nullptr) {
            std::size_t job = 0;
            while (work[job].table != t) ++job;
            raise_decode_error(std::string("table block: ") + problem, job);
        }
        decoders[t] = std::make_unique<mmpack::fields::Decoder>(model);
    }
    std::vector<const char*> errors(n_jobs, nullptr);
    // The order each thread decodes its share of the jobs in (sorted there).
    std::vector<std::size_t> order(n_jobs);
    std::iota(order.begin(), order.end(), std::size_t{0});
    ReadFailure read_failure;
    {
        py::gil_scoped_release release;
        // By decoded bytes; a thread is worth starting for 4 MiB of them (a few milliseconds of
        // decoding): reading one model of a set decodes a chunk per tensor on the calling thread.
        std::vector<std::uint64_t> prefix(n_jobs + 1, 0);
        for (std::size_t k = 0; k < n_jobs; ++k) prefix[k + 1] = prefix[k] + work[k].out_length;
        mmpack::parallel_by_weight(
            n_jobs, [&](std::size_t k) { return prefix[k]; },
            [&](std::size_t first, std::size_t last) {
                thread_local ChunkBuffers buffers;
                struct Trim {
                    ChunkBuffers& buffers;
                    ~Trim() { buffers.trim(); }
                } trim_after{buffers};
                const auto hash = [&](std::size_t k) {
                    const DecodeJob& job = work[k];
                    if (errors[k] == nullptr && job.hashes != nullptr) {
                        mmpack::hash_rows(mmpack::ConstBytes{job.out, job.out_length}, job.row_bytes,
                                          job.out_length / job.row_bytes, job.hashes);
                    }
                };
                // Chunks of one layout step together, of one tensor or not (a model's small
                // tensors are a chunk each), taken longest first so that the chunks of a group
                // have about the same length and go on together to their ends.
                std::sort(order.begin() + first, order.begin() + last, [&](std::size_t a, std::size_t b) {
                    const mmpack::fields::Layout& la = table_layouts[work[a].table];
                    const mmpack::fields::Layout& lb = table_layouts[work[b].table];
                    if (la.width != lb.width) return la.width < lb.width;
                    if (la.family != lb.family) return la.family < lb.family;
                    if (work[a].out_length != work[b].out_length) return work[a].out_length > work[b].out_length;
                    return a < b;
                });
                for (std::size_t i = first; i < last;) {
                    if (read_failure.failed.load(std::memory_order_relaxed)) return;  // the call fails anyway
                    const DecodeJob& job = work[order[i]];
                    const mmpack::fields::Layout& layout = table_layouts[job.table];
                    unsigned together = 1;
                    // Chunks read from files step together only while small: a thread then holds at
                    // most one large chunk's bytes (a row of 64 MiB is a chunk of its own).
                    std::size_t held = job.length;
                    while (together < mmpack::rans::kMaxTogether && i + together < last) {
                        const DecodeJob& other = work[order[i + together]];
                        if (table_layouts[other.table] != layout) break;
                        if (source.from_files && held + other.length > kTogetherBytes) break;
                        held += other.length;
                        ++together;
                    }
                    const mmpack::fields::Decoder* chosen[mmpack::rans::kMaxTogether];
                    mmpack::ConstBytes chunks[mmpack::rans::kMaxTogether];
                    mmpack::MutableBytes outs[mmpack::rans::kMaxTogether];
                    std::size_t elements[mmpack::rans::kMaxTogether];
                    for (unsigned t = 0; t < together; ++t) {
                        const std::size_t k = order[i + t];
                        const DecodeJob& one = work[k];
                        const std::byte* payload = one.payload;
                        if (source.from_files) {
                            std::byte* buffer = buffers.get(t, one.length);
                            if (buffer == nullptr && one.length != 0) {
                                read_failure.record_out_of_memory(k);
                                return;
                            }
                            const mmpack::ReadOutcome read = mmpack::read_exact(one.fd, one.position, buffer, one.length);
                            if (read.status != mmpack::ReadOutcome::Status::ok) {
                                read_failure.record(k, read);
                                return;
                            }
                            payload = buffer;
                        }
                        chosen[t] = decoders[one.table].get();
                        chunks[t] = {payload, one.length};
                        outs[t] = {one.out, one.out_length};
                        elements[t] = one.elements;
                    }
                    const char* group_errors[mmpack::rans::kMaxTogether];
                    mmpack::fields::Decoder::decode_together(chosen, chunks, outs, elements, together, group_errors);
                    for (unsigned t = 0; t < together; ++t) {
                        errors[order[i + t]] = group_errors[t];
                        hash(order[i + t]);
                    }
                    i += together;
                }
            },
            std::uint64_t{4} << 20);
    }
    if (read_failure.failed.load() && read_failure.out_of_memory) throw std::bad_alloc();  // MemoryError
    if (read_failure.failed.load()) {
        raise_read_failure(read_failure.outcome, work[read_failure.job].file, "job " + std::to_string(read_failure.job));
    }
    for (std::size_t k = 0; k < n_jobs; ++k) {
        if (errors[k] != nullptr) raise_decode_error(errors[k], k);
    }
}

void py_rans_decode(const py::sequence& tables, const py::handle& layouts, const py::sequence& payloads,
                    const py::handle& jobs, const py::sequence& dst, const py::object& hashes) {
    ChunkSource source;
    source.buffers = hold_buffers(payloads, false, "payloads");
    rans_decode_jobs(tables, layouts, source, jobs, dst, hashes);
}

void py_rans_decode_files(const py::sequence& tables, const py::handle& layouts, const py::sequence& fds,
                          const py::handle& jobs, const py::sequence& dst, const py::object& hashes) {
    ChunkSource source;
    source.from_files = true;
    source.fds = descriptors(fds);
    rans_decode_jobs(tables, layouts, source, jobs, dst, hashes);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "mmpack's C++ kernels: gather/scatter of many tensors, XXH3-64 hashing, byte-plane transforms.";

    m.def("xxh3_64", &py_xxh3_64, py::arg("data"), py::arg("seed") = 0,
          "XXH3-64 digest of a C-contiguous buffer (equal to xxhash.xxh3_64_intdigest).");
    m.def("hash_rows", &py_hash_rows, py::arg("data"), py::arg("row_bytes"), py::arg("out"),
          "out[r] = XXH3-64 of row r of data, which must hold exactly len(out) rows of row_bytes bytes.");
    m.def("gather", &py_gather, py::arg("src_addresses"), py::arg("lengths"), py::arg("dst"),
          py::arg("dst_index"), py::arg("dst_offsets"), py::arg("hashes") = py::none(),
          "Copy segment k from raw address src_addresses[k] to dst[dst_index[k]] at dst_offsets[k];\n"
          "hashes[k] receives its XXH3-64. Destinations are bounds-checked; the caller keeps the\n"
          "source tensors alive and guarantees each holds lengths[k] bytes.");
    m.def("scatter", &py_scatter, py::arg("src"), py::arg("src_index"), py::arg("src_offsets"),
          py::arg("lengths"), py::arg("dst_addresses"),
          "Copy segment k from src[src_index[k]] at src_offsets[k] to raw address dst_addresses[k].\n"
          "Sources are bounds-checked; the caller guarantees each destination holds lengths[k] bytes.");
    m.def("copy_segments", &py_copy_segments, py::arg("src"), py::arg("src_index"), py::arg("src_offsets"),
          py::arg("dst"), py::arg("dst_index"), py::arg("dst_offsets"), py::arg("lengths"),
          py::arg("hashes") = py::none(), py::kw_only(), py::arg("xor") = false,
          "Copy segment k between buffers, both ends bounds-checked; optional XXH3-64 per segment\n"
          "(of the destination after the copy). With xor=True the source is XORed into the destination.");
    m.def("read_rows", &py_read_rows, py::arg("fds"), py::arg("fd_index"), py::arg("offsets"), py::arg("row_bytes"),
          py::arg("counts"), py::arg("dst"), py::arg("dst_index"), py::arg("dst_offsets"),
          py::arg("hashes") = py::none(), py::kw_only(), py::arg("xor") = false,
          "Run k: counts[k] rows of row_bytes[k] bytes at file position offsets[k] of fds[fd_index[k]],\n"
          "read with pread(2) into dst[dst_index[k]] at dst_offsets[k] (XORed into it with xor=True).\n"
          "hashes[i] receives the XXH3-64 of row i, rows numbered in run order. Every range is checked\n"
          "before any byte moves; a file that ends early raises ShortReadError, a failed read OSError\n"
          "(its file_index: the index in fds of the file whose read failed).");
    g_short_read_error = PyErr_NewExceptionWithDoc(
        "mmpack._native.ShortReadError",
        "A file ended before a read of read_rows or rans_decode_files did; args: (message, file index,\n"
        "position, wanted end).",
        PyExc_EOFError, nullptr);
    if (g_short_read_error == nullptr) throw py::error_already_set();
    m.attr("ShortReadError") = py::handle(g_short_read_error);
    m.def(
        "split_byte_planes",
        [](const py::handle& src, const py::handle& dst, std::size_t width) { py_byte_planes(src, dst, width, true); },
        py::arg("src"), py::arg("dst"), py::arg("width"),
        "Regroup the bytes of width-byte elements: dst holds byte plane width-1 (most significant) of\n"
        "every element, then plane width-2, ... plane 0, then the len(src) % width trailing bytes.");
    m.def(
        "merge_byte_planes",
        [](const py::handle& src, const py::handle& dst, std::size_t width) { py_byte_planes(src, dst, width, false); },
        py::arg("src"), py::arg("dst"), py::arg("width"), "The inverse of split_byte_planes.");
    m.def("merge_byte_planes_from", &py_merge_byte_planes_from, py::arg("planes"), py::arg("dst"), py::arg("width"),
          "The inverse of split_byte_planes with each of the width planes in its own buffer of\n"
          "len(dst) // width bytes (len(dst) must be a multiple of width).");
    py::class_<EncodedSection>(m, "EncodedSection", py::buffer_protocol(),
                               "One tensor's section of a version 3 object: its table block, then its chunks.")
        .def_buffer([](EncodedSection& s) {
            return py::buffer_info(s.bytes.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                                   {s.bytes.size()}, {1}, true);
        })
        .def_property_readonly("table_length", [](const EncodedSection& s) { return s.table_length; })
        .def_property_readonly("chunk_lengths", [](const EncodedSection& s) { return s.chunk_lengths; });
    m.def("rans_encode", &py_rans_encode, py::arg("data"), py::arg("rows"), py::arg("row_bytes"), py::arg("chunk_rows"),
          py::arg("layout"),
          "Encode rows (rows * row_bytes bytes of data) as a version 3 tensor section: one table block\n"
          "chosen from all the rows, then chunks of chunk_rows rows. layout = element width | family << 8\n"
          "(family 0 float, 1 integer, 2 float16). Chunks are encoded on the kernels' threads.");
    g_decode_error = PyErr_NewExceptionWithDoc(
        "mmpack._native.DecodeError", "A version 3 table block or chunk is corrupt; args: (message, job index).",
        PyExc_ValueError, nullptr);
    if (g_decode_error == nullptr) throw py::error_already_set();
    m.attr("DecodeError") = py::handle(g_decode_error);
    m.def("rans_decode", &py_rans_decode, py::arg("tables"), py::arg("layouts"), py::arg("payloads"), py::arg("jobs"),
          py::arg("dst"), py::arg("hashes") = py::none(),
          "Decode chunks of version 3 sections. Job k is jobs[10k:10k+10] = (table, payload, offset, length,\n"
          "dst index, dst offset, out length, row bytes, first hash, chunk bytes): the chunk at\n"
          "payloads[payload][offset:offset+length], which decodes to chunk bytes, decodes with\n"
          "tables[table] (layout layouts[table]) into out length bytes of dst[dst index] at dst offset;\n"
          "an out length below chunk bytes decodes only that prefix, whose streams' ends go unchecked\n"
          "(check the rows against stored hashes). With row bytes > 0 the XXH3-64 of each decoded row\n"
          "goes to hashes[first hash + r]. Every range is checked first; jobs must write disjoint ranges\n"
          "and run on the kernels' threads. A corrupt table or chunk raises DecodeError.");
    m.def("rans_decode_files", &py_rans_decode_files, py::arg("tables"), py::arg("layouts"), py::arg("fds"),
          py::arg("jobs"), py::arg("dst"), py::arg("hashes") = py::none(),
          "rans_decode with the chunks still in files: a job's payload index names fds[index] and its\n"
          "offset is a file position; each kernel thread reads the chunks it decodes with pread(2), so\n"
          "reading and decoding share the threads and a chunk is decoded while it is in cache. A file\n"
          "that ends early raises ShortReadError, a failed read OSError (with file_index, as read_rows).");
    m.def("rans_encoder_quotients", &py_rans_encoder_quotients, py::arg("states"), py::arg("freqs"), py::arg("out"),
          "out[i] = states[i] // freqs[i] (uint32 arrays; 1 <= freq < 4096, state < freq << 20) as the\n"
          "AVX-512 encoding loop divides when it is in use (rans_set_simd), else exactly: for tests of\n"
          "that loop's estimate.");
    m.def("rans_simd_path", [] { return mmpack::rans::simd_name(mmpack::rans::simd()); },
          "Instruction set of the rANS loops in use.");
    m.def("rans_simd_paths", &py_rans_simd_paths,
          "Instruction sets of the rANS loops this CPU can run, portable first.");
    m.def("rans_set_simd", &py_rans_set_simd, py::arg("path"),
          "Cap the rANS loops (decoding and encoding) at path (one of rans_simd_paths(); the best, the\n"
          "default, lets the CPU's best run); every path writes and reads the same bytes, and tests and\n"
          "benchmarks compare them.");
    m.def("set_max_threads", &mmpack::set_max_threads, py::arg("n"),
          "Threads the kernels may use (0 restores the default: hardware threads, at most 16).");
    m.def("max_threads", &mmpack::max_threads, "Threads the kernels may use.");
    m.def("simd_path", &mmpack::xxh3_simd_path, "Instruction set of the hash's long-input loop.");
    m.attr("PARALLEL_MIN_BYTES") = mmpack::kParallelMinBytes;
    m.attr("MAX_PLANE_WIDTH") = mmpack::kMaxPlaneWidth;
}
