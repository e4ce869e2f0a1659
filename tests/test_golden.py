"""Files written by released format versions must keep loading, byte for byte."""

import io
import struct

import golden_sets
import numpy as np
import pytest
import torch
from golden_sets import GOLDEN_DIR, GOLDEN_METADATA, golden_v1_modelset

import mmpack
from mmpack import FormatError, fileformat


def test_version_1_golden_file_loads_to_the_expected_values():
    loaded = mmpack.load(GOLDEN_DIR / "v1_mixed.mmpack")
    assert loaded.equal(golden_v1_modelset())
    assert mmpack.load(GOLDEN_DIR / "v1_mixed.mmpack", indices=[4, 1]).equal(golden_v1_modelset().select([4, 1]))


def test_version_1_writer_still_produces_the_golden_bytes():
    buffer = io.BytesIO()
    mmpack.save(golden_v1_modelset(), buffer, metadata=GOLDEN_METADATA)
    assert buffer.getvalue() == (GOLDEN_DIR / "v1_mixed.mmpack").read_bytes()


def test_golden_header_records_what_the_spec_says():
    with open(GOLDEN_DIR / "v1_mixed.mmpack", "rb") as f:
        header = fileformat.read_header(mmpack._io.FileReader(f))
    assert header.n_models == 5
    assert header.metadata == GOLDEN_METADATA
    assert header.data_start % 64 == 0
    assert all(offset % 64 == 0 for offset in header.layout.tensor_offsets)


def test_version_1_rows_golden_file_reads_back_its_rows():
    from golden_sets import golden_v1_rows

    from mmpack import fileformat
    from mmpack._io import FileReader

    ms, changed = golden_v1_rows()
    image, _ = fileformat.encode_rows(ms, changed, ms.hashes(), GOLDEN_METADATA)
    assert image.tobytes() == (GOLDEN_DIR / "v1_rows.mmpack").read_bytes()
    with open(GOLDEN_DIR / "v1_rows.mmpack", "rb") as f, FileReader(f) as source:
        header = fileformat.read_header(source)
        assert header.layout.kind == "rows" and header.layout.rows == (2, 1, 2, 1, 1, 1, 2)
        index = fileformat.read_row_index(source, header)
        assert [ids.tolist() for ids in index] == [[1, 3], [3], [1, 3], [3], [3], [3], [3, 4]]
        assert np.array_equal(fileformat.read_hash_table(source, header), ms.hashes())
        columns = np.concatenate([np.full(len(ids), j) for j, ids in enumerate(index)])
        stored = np.concatenate([np.arange(len(ids)) for ids in index])
        models = np.concatenate(index)
        out = {s.name: torch.zeros((len(ms), *s.shape), dtype=s.dtype) for s in ms.architecture.tensors}
        views = [out[s.name].view(-1).view(torch.uint8).numpy() for s in ms.architecture.tensors]
        hashes = fileformat.read_rows(source, header, columns, stored, views, models)
        assert np.array_equal(hashes, ms.hashes()[models, columns])
    for j, spec in enumerate(ms.architecture.tensors):
        for i in np.flatnonzero(changed[:, j]):
            assert torch.equal(out[spec.name][i], ms.tensors[spec.name][i])


def test_loading_a_rows_object_as_a_model_set_explains_itself():
    with pytest.raises(FormatError, match="recover it through its repository"):
        mmpack.load(GOLDEN_DIR / "v1_rows.mmpack")


def test_version_2_compressed_golden_file_loads_to_the_expected_values():
    from golden_sets import GOLDEN_V2_MODELS, golden_v1_modelset

    expected = golden_v1_modelset(GOLDEN_V2_MODELS)
    path = GOLDEN_DIR / "v2_stacked_zstd.mmpack"
    assert mmpack.load(path).equal(expected)
    assert mmpack.load(path, indices=[47, 3, 20]).equal(expected.select([47, 3, 20]))
    with open(path, "rb") as f:
        header = fileformat.read_header(mmpack._io.FileReader(f))
    chunking = header.layout.chunking
    assert struct.unpack_from("<I", path.read_bytes(), 8)[0] == 2
    assert chunking.delta == "none" and chunking.chunk_rows == (10, 32, 25, 85, 32, 64, 85)
    widths = [4, 4, 2, 2, 8, 8, 1]
    assert any(length < raw for length, raw in _planes(chunking, header, widths))  # some planes are zstd frames
    assert any(length == raw for length, raw in _planes(chunking, header, widths))  # and some are stored raw


def _planes(chunking, header, widths):
    for j, spec in enumerate(header.architecture.tensors):
        rows = header.layout.rows[j]
        for k, length in enumerate(chunking.lengths[j]):
            c = k // widths[j]
            yield length, min(chunking.chunk_rows[j], rows - c * chunking.chunk_rows[j]) * spec.nbytes // widths[j]


def _xor_rows_golden_file_decodes_against_its_reference(name: str, version: int) -> None:
    from golden_sets import golden_v2_update

    from mmpack._io import FileReader

    new, changed, reference = golden_v2_update()
    with open(GOLDEN_DIR / name, "rb") as f, FileReader(f) as source:
        header = fileformat.read_header(source)
        assert header.layout.chunking.delta == "xor" and header.layout.version == version
        index = fileformat.read_row_index(source, header)
        assert [ids.tolist() for ids in index] == [np.flatnonzero(changed[:, j]).tolist() for j in range(7)]
        assert np.array_equal(fileformat.read_hash_table(source, header), new.hashes())
        holders = np.flatnonzero(changed.any(axis=1))
        out = {s.name: torch.zeros((len(new), *s.shape), dtype=s.dtype) for s in new.architecture.tensors}
        for spec in new.architecture.tensors:  # the references in place, as a repository puts them
            out[spec.name][torch.from_numpy(holders)] = reference.tensors[spec.name]
        views = [out[s.name].view(-1).view(torch.uint8).numpy() for s in new.architecture.tensors]
        columns = np.concatenate([np.full(len(ids), j) for j, ids in enumerate(index)])
        stored = np.concatenate([np.arange(len(ids)) for ids in index])
        models = np.concatenate(index)
        request = fileformat.RowRequest(source, header, columns, stored, models, xor=True)
        hashes = fileformat.read_rows_many([request], views)[0]
        assert np.array_equal(hashes, new.hashes()[models, columns])
    for j, spec in enumerate(new.architecture.tensors):
        for i in np.flatnonzero(changed[:, j]):
            got, want = out[spec.name][i].reshape(-1), new.tensors[spec.name][i].reshape(-1)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_version_2_xor_rows_golden_file_decodes_against_its_reference():
    _xor_rows_golden_file_decodes_against_its_reference("v2_rows_xor_zstd.mmpack", 2)


def test_version_2_writer_still_produces_the_golden_bytes_with_the_same_zstd():
    from golden_sets import golden_v2_images, zstd_library_version

    recorded = (GOLDEN_DIR / "v2_zstd_version.txt").read_text().strip()
    if zstd_library_version() != recorded:
        pytest.skip(f"zstd {zstd_library_version()} may encode differently from {recorded}; reading is tested above")
    for name, blob in golden_v2_images().items():
        assert blob == (GOLDEN_DIR / name).read_bytes(), name


V3_PAIRS = golden_sets.GOLDEN_V3_PAIRS


@pytest.mark.parametrize("name", [stacked for stacked, _ in V3_PAIRS])
def test_version_3_golden_file_loads_to_the_expected_values(name):
    from golden_sets import GOLDEN_V2_MODELS, golden_v1_modelset

    expected = golden_v1_modelset(GOLDEN_V2_MODELS)
    path = GOLDEN_DIR / name
    assert mmpack.load(path).equal(expected)
    assert mmpack.load(path, indices=[47, 3, 20]).equal(expected.select([47, 3, 20]))
    with open(path, "rb") as f:
        header = fileformat.read_header(mmpack._io.FileReader(f))
    assert struct.unpack_from("<I", path.read_bytes(), 8)[0] == 3
    chunking = header.layout.chunking
    assert chunking.delta == "none" and chunking.chunk_rows == (10, 32, 25, 85, 32, 64, 85)


@pytest.mark.parametrize("name", [rows for _, rows in V3_PAIRS])
def test_version_3_xor_rows_golden_file_decodes_against_its_reference(name):
    _xor_rows_golden_file_decodes_against_its_reference(name, 3)


def test_version_3_writer_still_produces_the_golden_bytes():
    # mmpack's own encoder, integer decisions only: the bytes do not depend on a library version.
    from golden_sets import golden_v3_images

    for name, blob in golden_v3_images().items():
        assert blob == (GOLDEN_DIR / name).read_bytes(), name


@pytest.mark.parametrize("pair", V3_PAIRS, ids=lambda pair: pair[0])
def test_the_spec_decoder_reads_the_version_3_golden_files_and_they_use_every_code(pair):
    import rans_reference

    from mmpack import dtypes
    from mmpack._io import FileReader

    seen = set()
    for name in pair:
        blob = (GOLDEN_DIR / name).read_bytes()
        header = fileformat.read_header(FileReader(io.BytesIO(blob)))
        chunking, layout = header.layout.chunking, header.layout
        decoded = {}
        for j, spec in enumerate(header.architecture.tensors):
            start = header.data_start + layout.tensor_offsets[j]
            family, e = rans_reference.layout_of(dtypes.dtype_name(spec.dtype))
            table = rans_reference.parse_table_block(blob[start : start + chunking.tables[j]],
                                                     rans_reference.field_widths(family, e))
            for field in table:
                seen.add(field["mode"])
                seen.update("zero symbol" for s in field.get("symbols", []) if s["zero"])
                seen.update("raw bits" for s in field.get("symbols", []) if not s["zero"] and s["r"])
            pieces, at = [], start + chunking.tables[j]
            for c, length in enumerate(chunking.lengths[j]):
                rows = min(chunking.chunk_rows[j], layout.rows[j] - c * chunking.chunk_rows[j])
                pieces.append(rans_reference.decode_chunk(blob[at : at + length], table, family, e,
                                                          rows * spec.nbytes // e))
                at += length
            decoded[spec.name] = b"".join(pieces)
        if name.startswith("v3_stacked"):
            from golden_sets import GOLDEN_V2_MODELS, golden_v1_modelset

            expected = golden_v1_modelset(GOLDEN_V2_MODELS)
            for spec in header.architecture.tensors:
                raw = expected.tensors[spec.name].contiguous().view(torch.uint8).numpy().tobytes()
                assert decoded[spec.name] == raw
    assert seen == {"raw", "constant", "rans", "zero symbol", "raw bits"}
