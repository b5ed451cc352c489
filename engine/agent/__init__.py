"""The voice agent: VAD, ASR, the chat LLM, reply streaming and the transport-free conversation."""
