"""Files written by released format versions must keep loading, byte for byte."""

import io

import mmpack
from mmpack import fileformat

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
