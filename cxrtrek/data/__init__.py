"""Data in: CXRTrek-format files (:mod:`~cxrtrek.data.cxrtrek`), a study from image files
(:mod:`~cxrtrek.data.intake`), PNG, JPEG and DICOM decoding with its checks
(:mod:`~cxrtrek.data.images`), phantom studies with known truth (:mod:`~cxrtrek.data.phantoms`),
and the bundled example images and study."""
