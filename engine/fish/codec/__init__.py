"""Our implementation of Fish Speech's modded-DAC codec (spec §5): load `codec.pth`, encode
44.1 kHz audio to codes, decode codes to audio whole or incrementally."""
from engine.fish.codec.config import CodecConfig
from engine.fish.codec.errors import CodecCheckpointError
from engine.fish.codec.loader import load_codec, read_state_dict
from engine.fish.codec.model import Codec
from engine.fish.codec.streaming import StreamingDecoder
from engine.fish.codec.tiny import make_tiny_codec_state_dict, tiny_codec_config, write_tiny_codec

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
