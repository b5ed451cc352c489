"""Text for speech: normalisation, chunking long text for the model, sentence splitting of streamed text."""
