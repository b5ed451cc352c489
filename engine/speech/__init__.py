"""The TTS pipeline: text + reference voice -> streamed PCM, one model thread serving every request."""
