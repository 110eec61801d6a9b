"""Data: CXRTrek-format I/O, image and DICOM decoding, bundled examples."""
