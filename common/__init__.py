"""Shared, dependency-free helpers every writer uses (imports no other moeca package).

:mod:`moeca.common.outputs`: atomic files (replacing only files moeca wrote, recorded in
``.moeca-files.json``), manifest-guarded output folders, cleanup of a killed run's temporaries,
input/output overlap checks and one translation of OS errors into user errors.
:mod:`moeca.common.inputs`: one message for a missing input path and one for the wrong kind of path.
"""
from .outputs import (FILES_SIDECAR, MANIFEST, OutputError, adopt_file, atomic_file, atomic_write_text, check_no_overlap,
                      check_output_dir, check_replace_file, os_errors, output_dir, record_manifest, remove_listed,
                      remove_stale_temporaries, written_by_moeca)

__all__ = ["FILES_SIDECAR", "MANIFEST", "OutputError", "adopt_file", "atomic_file", "atomic_write_text", "check_no_overlap",
           "check_output_dir", "check_replace_file", "os_errors", "output_dir", "record_manifest", "remove_listed",
           "remove_stale_temporaries", "written_by_moeca"]
