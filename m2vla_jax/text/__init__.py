"""Text -> token ids: the Gemma SentencePiece tokenizer (`sentencepiece.py`, also rebuilt from a GGUF's
vocabulary) and the spec-named tokenizers every layer uses (`tokenizers.py`)."""
