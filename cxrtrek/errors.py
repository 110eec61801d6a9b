"""One exception hierarchy for cxrtrek.

Every error cxrtrek raises on purpose is a :class:`CXRTrekError`; messages say what was
expected and what was found. Only :class:`TransientError` and its subclasses are worth a retry.

::

    CXRTrekError
     +-- ConfigError                  bad settings or environment
     |    +-- BackendMismatchError    a run would go on with another backend than its own
     +-- DataError                    bad input data
     |    +-- FormatError             a CXRTrek-format file that does not follow the format
     |    +-- MissingImageError       an image a study names is not under the image root
     |    +-- ImageDecodeError        a file that cannot be decoded as an image
     |    |    +-- EmptyFileError
     |    |    +-- TruncatedImageError
     |    |    +-- NotAnImageError
     |    |    +-- UnsupportedTransferSyntaxError
     |    |    +-- DecompressionBombError
     |    +-- NotARadiographError     a decodable image that is not a chest radiograph
     |                                (wrong modality or body part)
     +-- ParseError                   model output that a strict caller required parsed
     +-- BackendError                 the VLM backend failed
          +-- TransientError          worth a retry (timeouts, connection errors, 429, 5xx)
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendMismatchError",
    "CXRTrekError",
    "ConfigError",
    "DataError",
    "DecompressionBombError",
    "EmptyFileError",
    "FormatError",
    "ImageDecodeError",
    "MissingImageError",
    "NotARadiographError",
    "NotAnImageError",
    "ParseError",
    "TransientError",
    "TruncatedImageError",
    "UnsupportedTransferSyntaxError",
]


class CXRTrekError(Exception):
    """Base of every error cxrtrek raises on purpose."""


class ConfigError(CXRTrekError):
    """Settings or environment are invalid."""


class BackendMismatchError(ConfigError):
    """A run would go on with another backend than the one it was started with (and the
    switch was not asked for)."""


class DataError(CXRTrekError):
    """Input data is invalid."""


class FormatError(DataError):
    """A CXRTrek-format file or record does not follow the format."""


class MissingImageError(DataError):
    """An image named by a study does not exist under the image root."""


class ImageDecodeError(DataError):
    """A file cannot be decoded as an image."""


class EmptyFileError(ImageDecodeError):
    """The file is empty."""


class TruncatedImageError(ImageDecodeError):
    """The file ends before the image data does."""


class NotAnImageError(ImageDecodeError):
    """The file is not an image format cxrtrek reads (PNG, JPEG, DICOM)."""


class UnsupportedTransferSyntaxError(ImageDecodeError):
    """A DICOM file is compressed with a transfer syntax no installed decoder handles."""


class DecompressionBombError(ImageDecodeError):
    """The image has more pixels than the configured limit."""


class NotARadiographError(DataError):
    """A decodable image that is not a chest radiograph (modality or body part)."""


class ParseError(CXRTrekError):
    """Model output could not be parsed where a parse was required."""


class BackendError(CXRTrekError):
    """The VLM backend failed."""


class TransientError(BackendError):
    """A backend failure worth retrying: timeouts, connection errors, HTTP 429 and 5xx."""
