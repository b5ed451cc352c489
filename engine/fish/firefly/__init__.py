"""Our implementation of the Firefly VQGAN codec of fish-speech-1.5 (spec §5.9): log-mel ConvNeXt
encoder, grouped FSQ (8 × 1000 codes), causal HiFi-GAN-style decoder. Same public surface as
`engine.fish.codec.Codec`, so `StreamingDecoder` and the TTS pipeline use it unchanged."""
from engine.fish.firefly.config import FireflyConfig
from engine.fish.firefly.loader import find_firefly_file, load_firefly
from engine.fish.firefly.model import FireflyCodec
from engine.fish.firefly.tiny import make_tiny_firefly_state_dict, tiny_firefly_config, write_tiny_firefly

__all__ = ["FireflyCodec", "FireflyConfig", "find_firefly_file", "load_firefly", "make_tiny_firefly_state_dict",
           "tiny_firefly_config", "write_tiny_firefly"]
