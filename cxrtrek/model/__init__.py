"""CXRTrekNet: model, tokenizer, training and the model server."""
