"""The one-file format for one model set (docs/FORMAT.md): ``save`` and ``load``.

Reading never unpickles and never imports: the header is JSON checked
against a fixed schema, and dtypes come from a fixed table.
"""

from mmpack.fileformat.header import (
    ALIGNMENT,
    COMPRESSED_FORMAT_VERSION,
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    RANS_FORMAT_VERSION,
    ROWS,
    STACKED,
    Header,
    Layout,
    Reader,
    encode_header,
    read_header,
)
from mmpack.fileformat.loading import load
from mmpack.fileformat.mapping import MappedModelSet
from mmpack.fileformat.reading import (
    RowRequest,
    Tail,
    check_padding,
    check_size,
    read_hash_rows,
    read_hash_table,
    read_modelset,
    read_row_index,
    read_rows,
    read_rows_many,
    read_tail,
    verify_rows,
)
from mmpack.fileformat.writing import (
    encode,
    encode_image,
    encode_rows,
    image_pin,
    modelset_and_hashes,
    save,
    table_pin,
    write_body,
)

__all__ = [
    "ALIGNMENT",
    "COMPRESSED_FORMAT_VERSION",
    "RANS_FORMAT_VERSION",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "ROWS",
    "STACKED",
    "Header",
    "Layout",
    "MappedModelSet",
    "Reader",
    "check_padding",
    "check_size",
    "encode",
    "encode_header",
    "encode_image",
    "encode_rows",
    "image_pin",
    "load",
    "modelset_and_hashes",
    "read_hash_rows",
    "read_hash_table",
    "read_header",
    "read_modelset",
    "read_row_index",
    "read_rows",
    "read_rows_many",
    "read_tail",
    "RowRequest",
    "Tail",
    "save",
    "table_pin",
    "verify_rows",
    "write_body",
]
