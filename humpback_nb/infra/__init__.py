"""What the method runs on: loading models, decoding, resumable batches, processes, files, pinned sources."""
