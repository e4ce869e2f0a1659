"""Files written by released format versions must keep loading, byte for byte."""

import io

import numpy as np
import pytest
import torch

import mmpack
from mmpack import FormatError, fileformat

from golden_sets import GOLDEN_DIR, GOLDEN_METADATA, golden_v1_modelset


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
    from mmpack import fileformat
    from mmpack._io import FileReader

    from golden_sets import golden_v1_rows

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
