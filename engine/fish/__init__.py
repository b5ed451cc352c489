"""The Fish Speech model: Dual-AR transformer, its decode paths and sampling, tokenizer and prompt
formats, checkpoint loading, the modded-DAC codec (`codec/`), and tiny random checkpoints."""
