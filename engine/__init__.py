"""Everything that computes: Fish Speech models, TTS pipeline, ASR, VAD, agent LLM, conversation.

`engine` never imports `server` or `signaling`: those are transports built on top of it.
"""
