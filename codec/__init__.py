"""ISO 8583 bytes only: framing, specs, MTI, decode/encode and redaction. No I/O."""

from codec.errors import (
    CodecError,
    DecodeError,
    EncodeError,
    FrameTooLarge,
    FramingError,
    SpecError,
)
from codec.framing import (
    TPDU_LENGTH,
    Frame,
    FrameFormat,
    Framer,
    LengthPrefix,
    encode_frame,
    swap_tpdu,
)
from codec.message import Message, Salvage, decode, encode, field_order
from codec.mti import Mti
from codec.redact import LOGGABLE_FIELDS, SENSITIVE_FIELDS, loggable, mask_pan
from codec.spec import BUILTIN_SPECS, Spec, load_spec

__all__ = [
    "BUILTIN_SPECS",
    "LOGGABLE_FIELDS",
    "SENSITIVE_FIELDS",
    "TPDU_LENGTH",
    "CodecError",
    "DecodeError",
    "EncodeError",
    "Frame",
    "FrameFormat",
    "FrameTooLarge",
    "Framer",
    "FramingError",
    "LengthPrefix",
    "Message",
    "Mti",
    "Salvage",
    "Spec",
    "SpecError",
    "decode",
    "encode",
    "encode_frame",
    "field_order",
    "load_spec",
    "loggable",
    "mask_pan",
    "swap_tpdu",
]
