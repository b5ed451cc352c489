"""Our implementation of Fish Speech's modded-DAC codec (spec §5): load `codec.pth`, encode
44.1 kHz audio to codes, decode codes to audio whole or incrementally."""
from .config import CodecConfig
from .errors import CodecCheckpointError
from .loader import load_codec, read_state_dict
from .model import Codec
from .streaming import StreamingDecoder
from .tiny import make_tiny_codec_state_dict, tiny_codec_config, write_tiny_codec

__all__ = [
    "Codec",
    "CodecCheckpointError",
    "CodecConfig",
    "StreamingDecoder",
    "load_codec",
    "make_tiny_codec_state_dict",
    "read_state_dict",
    "tiny_codec_config",
    "write_tiny_codec",
]
