"""Sample DICOM files and their generator (a package only so tests can import the builder)."""
