"""Oscar/VinVL and BUTD TSV feature files: readers, writers and the geometry columns.

The format layer of ``vlkd-extract import-tsv`` / ``export-tsv`` (docs/TSV.md): these modules
read and write the other projects' files exactly as their code does, and know nothing of
region sets.

- :mod:`.rows`: a TSV file as rows, Oscar's ``.lineidx`` (used, checked, or built by
  scanning), streaming and random access, atomic writing (:class:`TsvRows`,
  :class:`TsvWriter`).
- :mod:`.records`: what a row becomes, :class:`TsvImage` or :class:`TsvFailure`.
- :mod:`.geometry`: the 6 (or 4) box-geometry columns after VinVL's 2048 region features.
- :mod:`.oscar`: ``feature.tsv`` / ``label.tsv`` / ``hw.tsv`` (:class:`OscarTsv`,
  :class:`OscarTsvWriter` and the per-file writers) and SGB's ``predictions.tsv`` with
  per-box features (:class:`SgbPredictionsTsv`).
- :mod:`.butd`: bottom-up-attention and LXMERT TSV (:class:`ButdTsv`,
  :class:`ButdTsvWriter`).
"""
from .butd import BUTD_FIELDS, LXMERT_FIELDS, ButdTsv, ButdTsvWriter
from .geometry import (GEOMETRY_NAMES, GeometryCheck, boxes_from_geometry, check_geometry,
                       default_atol, detect_geometry, estimate_image_hw, make_geometry,
                       split_geometry)
from .oscar import (KNOWN_FEATURE_DIMS, FeatureLayout, FeatureTsvWriter, HwTsvWriter,
                    LabelTsvWriter, OscarTsv, OscarTsvWriter, SgbPredictionsTsv,
                    oscar_vqa_paths)
from .records import EmptyImageError, FEATURE_DTYPES, TsvFailure, TsvFormatError, TsvImage
from .rows import (TsvIndexError, TsvRows, TsvWriter, check_image_id, lineidx_path,
                   read_lineidx, scan_line_starts, verify_line_starts, write_lineidx)

__all__ = [
    "BUTD_FIELDS", "ButdTsv", "ButdTsvWriter", "EmptyImageError", "FEATURE_DTYPES", "FeatureLayout",
    "FeatureTsvWriter", "GEOMETRY_NAMES", "GeometryCheck", "HwTsvWriter", "KNOWN_FEATURE_DIMS",
    "LXMERT_FIELDS", "LabelTsvWriter", "OscarTsv", "OscarTsvWriter", "SgbPredictionsTsv",
    "TsvFailure",
    "TsvFormatError", "TsvImage", "TsvIndexError", "TsvRows", "TsvWriter",
    "boxes_from_geometry", "check_geometry", "check_image_id", "default_atol",
    "detect_geometry", "estimate_image_hw", "lineidx_path", "make_geometry", "oscar_vqa_paths",
    "read_lineidx", "scan_line_starts", "split_geometry", "verify_line_starts",
    "write_lineidx",
]
